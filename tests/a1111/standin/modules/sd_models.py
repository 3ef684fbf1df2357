"""modules.sd_models: the loaded checkpoint's identity and what the WebUI does to a model once built (a1111.md
§7, sdxl.md §1, §4): its type flags, SDXL's extension, FP8 storage, --medvram placement, the hijack, the
embedding reload and the empty prompt's conditioning. The tests build the model from config and hand it over
(no weights file is read)."""

import enum
import os

import torch

from modules import devices, lowvram, sd_models_xl, shared


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


class CheckpointInfo:
    def __init__(self, filename, sha256=None):
        self.filename = filename
        name = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = name.replace("/", "_").replace("\\", "_")
        self.sha256 = sha256
        self.shorthash = sha256[:10] if sha256 else None
        self.title = f"{os.path.basename(filename)} [{self.shorthash}]"


def set_model_type(model, state_dict):
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_ssd = model.is_sd3 = False
    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        model.is_sd3, model.model_type = True, ModelType.SD3
    elif hasattr(model, "conditioner"):
        model.is_sdxl = True
        # Segmind's distilled SDXL has no attention in the middle block.
        if "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in state_dict:
            model.is_ssd, model.model_type = True, ModelType.SSD
        else:
            model.model_type = ModelType.SDXL
    elif hasattr(model.cond_stage_model, "model"):
        model.is_sd2, model.model_type = True, ModelType.SD2
    else:
        model.is_sd1, model.model_type = True, ModelType.SD1


def set_model_fields(model):
    if not hasattr(model, "latent_channels"):
        model.latent_channels = 4


def check_fp8(model):
    if model is None:
        return None
    setting = shared.opts.fp8_storage
    return setting == "Enable" or (getattr(model, "is_sdxl", False) and setting == "Enable for SDXL")


def store_weights_in_fp8(model):
    """Every Conv2d/Linear outside the VAE keeps its weights as float8_e4m3fn (token tables, norms and
    open_clip's fused attention in-projection are other module types and stay as they are)."""
    vae, model.first_stage_model = model.first_stage_model, None
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            if shared.opts.cache_fp16_weight:
                module.fp16_weight = module.weight.data.clone().cpu().half()
                if module.bias is not None:
                    module.fp16_bias = module.bias.data.clone().cpu().half()
            module.to(torch.float8_e4m3fn)
    model.first_stage_model = vae


def apply_model_weights_settings(model, checkpoint_info):
    """load_model_weights, less reading the weights: type flags, SDXL's attributes, FP8."""
    state_dict = model.state_dict()
    set_model_type(model, state_dict)
    set_model_fields(model)
    if model.is_sdxl:
        sd_models_xl.extend_sdxl(model)
    unet_input = model.model.state_dict().get("diffusion_model.input_blocks.0.0.weight")
    model.is_sdxl_inpaint = model.is_sdxl and unet_input is not None and unet_input.shape[1] == 9
    model.alphas_cumprod_original = model.alphas_cumprod
    devices.fp8 = bool(check_fp8(model))
    if devices.fp8:
        store_weights_in_fp8(model)
    model.sd_model_hash = checkpoint_info.shorthash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info


def send_model_to_device(model):
    lowvram.apply(model)
    if not model.lowvram:
        model.to(devices.device)


def get_empty_cond(model):
    """The conditioning of "" as a positive prompt (not zeroed); SDXL: its crossattn part."""
    cond = model.get_learned_conditioning([""])
    return cond["crossattn"] if isinstance(cond, dict) else cond


def load_model(model, checkpoint_info):
    """What the WebUI does with a model after instantiating it (A1111's load_model from "load weights" on)."""
    from modules import sd_hijack

    apply_model_weights_settings(model, checkpoint_info)
    send_model_to_device(model)
    sd_hijack.model_hijack.hijack(model)
    model.eval()
    shared.sd_model = model
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    with devices.autocast(), torch.no_grad():
        model.cond_stage_model_empty_prompt = get_empty_cond(model)
    return model


def unload_model(model):
    from modules import sd_hijack

    sd_hijack.model_hijack.undo_hijack(model)
    shared.sd_model = None
