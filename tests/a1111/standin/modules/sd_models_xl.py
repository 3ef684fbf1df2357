"""modules.sd_models_xl: what makes sgm's DiffusionEngine usable where the WebUI expects an ldm model (sdxl.md §1-2).

Importing it patches sgm's classes: `DiffusionEngine.get_learned_conditioning` (prompts -> sgm's batch dict ->
the conditioner), `apply_model` (the UNet wrapper on a conditioning dict), `get_first_stage_encoding` (the
identity: sgm's `encode_first_stage` already samples and scales), and on `GeneralConditioner` the methods the
embedding database and the prompt-length counter call on `cond_stage_model`, each delegated to the text
wrappers. `extend_sdxl(model)` adds the ldm-like attributes.
"""

import sgm.models.diffusion
import sgm.modules
import sgm.modules.diffusionmodules.denoiser_scaling
import sgm.modules.diffusionmodules.discretizer
import torch

from modules import devices, shared


def _size_rows(values, count):
    return torch.tensor(values, device=devices.device, dtype=devices.dtype).repeat(count, 1)


def get_learned_conditioning(self, batch):
    """`batch`: a list of prompts, or a prompt_parser.SdConditioning carrying the image size and whether these
    are negative prompts. Sizes are (height, width) in pixels; a plain list means 1024x1024."""
    for embedder in self.conditioner.embedders:
        embedder.ucg_rate = 0.0
    width = getattr(batch, "width", 1024) or 1024
    height = getattr(batch, "height", 1024) or 1024
    is_negative_prompt = getattr(batch, "is_negative_prompt", False)
    opts = shared.opts
    aesthetic_score = (
        opts.sdxl_refiner_low_aesthetic_score
        if is_negative_prompt
        else opts.sdxl_refiner_high_aesthetic_score
    )
    count = len(batch)
    sdxl_conds = {
        "txt": batch,
        "original_size_as_tuple": _size_rows([height, width], count),
        "crop_coords_top_left": _size_rows([opts.sdxl_crop_top, opts.sdxl_crop_left], count),
        "target_size_as_tuple": _size_rows([height, width], count),
        "aesthetic_score": _size_rows([aesthetic_score], count),
    }
    # Only an all-empty negative prompt is zeroed (its text parts: crossattn and the pooled vector).
    zero_text = is_negative_prompt and all(text == "" for text in batch)
    return self.conditioner(sdxl_conds, force_zero_embeddings=["txt"] if zero_text else [])


def apply_model(self, x, t, cond):
    if self.is_sdxl_inpaint:
        x = torch.cat([x] + cond["c_concat"], dim=1)
    return self.model(x, t, cond)


def get_first_stage_encoding(self, x):
    return x


sgm.models.diffusion.DiffusionEngine.get_learned_conditioning = get_learned_conditioning
sgm.models.diffusion.DiffusionEngine.apply_model = apply_model
sgm.models.diffusion.DiffusionEngine.get_first_stage_encoding = get_first_stage_encoding


def _text_embedders_with(conditioner, method):
    return [embedder for embedder in conditioner.embedders if hasattr(embedder, method)]


def encode_embedding_init_text(self, init_text, nvpt):
    """Every text encoder's token embeddings of the text, side by side: CLIP-L's then bigG's columns."""
    parts = [
        e.encode_embedding_init_text(init_text, nvpt)
        for e in _text_embedders_with(self, "encode_embedding_init_text")
    ]
    return torch.cat(parts, dim=1)


def tokenize(self, texts):
    for embedder in _text_embedders_with(self, "tokenize"):
        return embedder.tokenize(texts)
    raise AssertionError("no tokenizer available")


def process_texts(self, texts):
    for embedder in _text_embedders_with(self, "process_texts"):
        return embedder.process_texts(texts)


def get_target_prompt_token_count(self, token_count):
    for embedder in _text_embedders_with(self, "get_target_prompt_token_count"):
        return embedder.get_target_prompt_token_count(token_count)


sgm.modules.GeneralConditioner.encode_embedding_init_text = encode_embedding_init_text
sgm.modules.GeneralConditioner.tokenize = tokenize
sgm.modules.GeneralConditioner.process_texts = process_texts
sgm.modules.GeneralConditioner.get_target_prompt_token_count = get_target_prompt_token_count


def extend_sdxl(model):
    """SD 1.x-like attributes on an SDXL model, for the rest of the WebUI."""
    unet = model.model.diffusion_model
    unet.dtype = next(unet.parameters()).dtype
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
    is_v = isinstance(model.denoiser.scaling, sgm.modules.diffusionmodules.denoiser_scaling.VScaling)
    model.parameterization = "v" if is_v else "eps"
    # The default schedule, whatever the yaml's discretization says.
    schedule = sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization()
    model.alphas_cumprod = torch.asarray(schedule.alphas_cumprod, device=devices.device, dtype=torch.float32)
    model.conditioner.wrapped = torch.nn.Module()
