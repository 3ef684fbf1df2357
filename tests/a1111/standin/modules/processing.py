"""modules.processing: txt2img as the trainer's previews use it (a1111.md §1.5 "Preview").

`process_images(p)` reloads the embedding database first unless `p.do_not_reload_embeddings` (the reload would
replace an embedding registered in memory with the file on disk), computes the conditioning through the
model's `get_learned_conditioning` on SdConditioning lists that carry the image size (which SDXL's size
embeddings use; the negative one is marked, so SDXL zeroes an empty negative prompt), samples and decodes, all
under `devices.autocast()`. A plain deterministic DDIM sampler with classifier-free
guidance stands in for the WebUI's k-diffusion samplers: previews only need to depend on the conditioning.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from modules import devices, prompt_parser, sd_hijack, shared

# Test probe (not in A1111): the conditioning of every prompt processed, as (prompt, tensor), for SDXL
# (prompt, {"crossattn": tensor, "vector": tensor}).
conditioning_log = []


def _detached_copy(cond):
    if isinstance(cond, dict):
        return {key: value.detach().cpu().clone() for key, value in cond.items()}
    return cond.detach().cpu().clone()


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


def _ddim(model, cond, uncond, p, generator):
    alphas = model.alphas_cumprod.detach().double().cpu()
    steps = torch.linspace(len(alphas) - 1, 0, p.steps).round().long().tolist()
    latent_shape = (1, 4, p.height // 8, p.width // 8)
    x = torch.randn(latent_shape, generator=generator, dtype=torch.float64)
    for index, t in enumerate(steps):
        a = alphas[t]
        a_next = (
            alphas[steps[index + 1]] if index + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        )
        t_batch = torch.tensor([t], device=devices.device)
        x_in = x.to(devices.device, torch.float32)
        with_text = model.apply_model(x_in, t_batch, cond).double().cpu()
        without_text = model.apply_model(x_in, t_batch, uncond).double().cpu()
        out = without_text + p.cfg_scale * (with_text - without_text)
        if model.parameterization == "v":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        shared.state.sampling_step = index + 1
        if shared.state.interrupted:
            return None
    return x


def process_images(p):
    if not p.do_not_reload_embeddings:
        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings()
    sd_hijack.model_hijack.clear_comments()
    model = p.sd_model or shared.sd_model
    if shared.state.job_count == -1:
        shared.state.job_count = p.n_iter
    seed = p.seed if p.seed != -1 else int(torch.randint(0, 2**31 - 1, (1,)))
    shared.state.sampling_steps = p.steps
    prompts = prompt_parser.SdConditioning([p.prompt], width=p.width, height=p.height)
    negative_prompts = prompt_parser.SdConditioning(
        [p.negative_prompt], width=p.width, height=p.height, is_negative_prompt=True
    )
    with torch.no_grad(), devices.autocast():
        cond = model.get_learned_conditioning(prompts)
        uncond = model.get_learned_conditioning(negative_prompts)
        conditioning_log.append((p.prompt, _detached_copy(cond)))
        latents = _ddim(model, cond, uncond, p, torch.Generator().manual_seed(seed))
        if latents is None:
            return Processed(p, [], [])
        pixels = model.decode_first_stage(latents.to(devices.device, torch.float32))
    array = ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    shared.state.nextjob()
    infotext = f"{p.prompt}\nNegative prompt: {p.negative_prompt}\nSteps: {p.steps}, Seed: {seed}"
    return Processed(p, [Image.fromarray(np.ascontiguousarray(array))], [infotext])
