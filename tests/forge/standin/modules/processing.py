"""modules.processing (Forge: modules/processing.py): txt2img as the trainer's previews use it.

`process_images(p)` loads the checkpoint if needed (`forge_model_reload`, l.804), then, in inference mode
(l.911): sets clip skip from the settings, takes the base model's objects (`forge_objects_original`, l.937),
computes the conditioning with `get_learned_conditioning` (the engine, with its embedding database) of
`SdConditioning` prompts carrying the image's width and height (the negative one marked negative: l.490-492),
asks the memory manager for the UNet (`load_models_gpu([unet], memory_required=...)`, as sampling_prepare does), samples
and decodes through the VAE patcher. A plain Euler sampler over the predictor's sigmas with classifier-free
guidance stands in for Forge's k-diffusion samplers; it stops at an Interrupt. SDXL's dict conditioning reaches
the UNet as Forge's `compile_conditions` hands it on (backend/sampling/condition.py): `crossattn` as
`c_crossattn`, `vector` as `y`. The infotext names the embeddings the engines used ("TI: name").
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from backend import memory_management
from backend.text_processing import classic_engine
from PIL import Image

from modules import sd_models, shared
from modules.prompt_parser import SdConditioning

# Test probe (not in Forge): the conditioning of every prompt processed, as (prompt, tensor or SDXL's dict).
conditioning_log = []


@dataclass
class StableDiffusionProcessingTxt2Img:
    sd_model: object = None
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler_name: str = None
    cfg_scale: float = 7.0
    seed: int = -1
    width: int = 512
    height: int = 512
    n_iter: int = 1
    batch_size: int = 1
    do_not_save_grid: bool = False
    do_not_save_samples: bool = False
    do_not_reload_embeddings: bool = False
    override_settings: dict = field(default_factory=dict)


@dataclass
class Processed:
    p: StableDiffusionProcessingTxt2Img
    images: list
    infotexts: list = field(default_factory=list)


def _model_conds(cond):
    """Forge's compile_conditions: a tensor is the cross-attention; SDXL's dict gives it and `y`."""
    if isinstance(cond, torch.Tensor):
        return {"c_crossattn": cond}
    return {"c_crossattn": cond["crossattn"], "y": cond["vector"]}


def _euler(unet_patcher, cond, uncond, p, generator):
    model = unet_patcher.model
    predictor = model.predictor
    steps = torch.linspace(len(predictor.sigmas) - 1, 0, p.steps)
    sigmas = torch.cat([predictor.sigma(steps), torch.zeros(1)])
    x = torch.randn((1, 4, p.height // 8, p.width // 8), generator=generator) * sigmas[0]
    for index in range(p.steps):
        sigma = sigmas[index].view(1)
        with_text = model.apply_model(x, sigma, **_model_conds(cond))
        without_text = model.apply_model(x, sigma, **_model_conds(uncond))
        denoised = without_text + p.cfg_scale * (with_text - without_text)
        x = x + (x - denoised) / sigma * (sigmas[index + 1] - sigma)
        shared.state.sampling_step = index + 1
        if shared.state.interrupted:
            return None
    return x


def process_images(p):
    p.sd_model, _ = sd_models.forge_model_reload()
    model = p.sd_model
    classic_engine.last_extra_generation_params.clear()
    seed = p.seed if p.seed != -1 else int(torch.randint(0, 2**31 - 1, (1,)))
    shared.state.sampling_steps = p.steps
    with torch.inference_mode():
        model.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
        model.forge_objects = model.forge_objects_original.shallow_copy()
        prompts = SdConditioning([p.prompt], width=p.width, height=p.height)
        negative_prompts = SdConditioning(
            [p.negative_prompt], width=p.width, height=p.height, is_negative_prompt=True
        )
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning(negative_prompts)
        logged = {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()
        conditioning_log.append((p.prompt, logged))
        unet = model.forge_objects.unet
        shape = [2, 4, p.height // 8, p.width // 8]
        memory_management.load_models_gpu([unet], memory_required=unet.memory_required(shape))
        latents = _euler(unet, cond, uncond, p, torch.Generator().manual_seed(seed))
        if latents is None:
            return Processed(p, [], [])
        pixels = model.decode_first_stage(latents)
    array = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    shared.state.nextjob()
    extra = "".join(f", {key}: {value}" for key, value in classic_engine.last_extra_generation_params.items())
    infotext = f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Seed: {seed}{extra}"
    return Processed(p, [Image.fromarray(np.ascontiguousarray(array))], [infotext])
