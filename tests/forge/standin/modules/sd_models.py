"""modules.sd_models (Forge: modules/sd_models.py): the checkpoint and the lazily loaded model.

`model_data.sd_model` is a `FakeInitialModel` until `forge_model_reload()` (inference mode) loads the
checkpoint in `model_data.forge_loading_parameters["checkpoint_info"]`: it unloads every model from the memory
manager, fills `dynamic_args` (embeddings folder, emphasis), calls `backend.loader.forge_loader`, sets
`sd_checkpoint_info`, `filename`, `sd_model_hash`, runs the `on_model_loaded` callbacks, and returns
`(model, reloaded)`; with unchanged loading parameters it returns the loaded model.
"""

import math

import torch
from backend import memory_management
from backend.args import dynamic_args

from modules import script_callbacks, shared


class CheckpointInfo:
    def __init__(self, filename, sha256=None):
        self.filename = str(filename)
        self.name = self.model_name = self.filename.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        self.sha256 = sha256
        self.shorthash = sha256[:10] if sha256 else None
        self.title = self.name if self.shorthash is None else f"{self.name} [{self.shorthash}]"

    def calculate_shorthash(self):
        return self.shorthash


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):
        words = len(prompt.replace(" ", ",").split(","))
        return words, math.ceil(max(words, 1) / self.chunk_length) * self.chunk_length


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, value):
        self.sd_model = value


model_data = SdModelData()


@torch.inference_mode()
def forge_model_reload():
    from backend.loader import forge_loader

    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
    checkpoint_info = model_data.forge_loading_parameters.get("checkpoint_info")
    if checkpoint_info is None:
        raise ValueError(
            "You do not have any model! Please download at least one model in [models/Stable-diffusion]."
        )
    dynamic_args["embedding_dir"] = shared.cmd_opts.embeddings_dir
    dynamic_args["emphasis_name"] = shared.opts.emphasis
    sd_model = forge_loader(checkpoint_info.filename)
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
