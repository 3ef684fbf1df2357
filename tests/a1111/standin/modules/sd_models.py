"""modules.sd_models: the loaded checkpoint's identity (A1111 puts it on the model as sd_checkpoint_info)."""

import os


class CheckpointInfo:
    def __init__(self, filename, sha256=None):
        self.filename = filename
        name = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = name.replace("/", "_").replace("\\", "_")
        self.sha256 = sha256
        self.shorthash = sha256[:10] if sha256 else None
        self.title = f"{os.path.basename(filename)} [{self.shorthash}]"


def load_model(model, checkpoint_info):
    """What the WebUI does with a model after instantiating it and loading its weights (a1111.md §7)."""
    from modules import sd_hijack, shared

    model.sd_checkpoint_info = checkpoint_info
    model.sd_model_hash = checkpoint_info.shorthash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.is_sd2 = hasattr(model.cond_stage_model, "model")
    model.alphas_cumprod_original = model.alphas_cumprod
    sd_hijack.model_hijack.hijack(model)
    model.eval()
    shared.sd_model = model
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    return model


def unload_model(model):
    from modules import sd_hijack, shared

    sd_hijack.model_hijack.undo_hijack(model)
    shared.sd_model = None
