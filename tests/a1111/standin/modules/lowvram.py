"""modules.lowvram: --lowvram / --medvram / --medvram-sdxl (sdxl.md §4).

The big parts stay in RAM and come to the device one at a time, by forward pre-hooks, the part there before
going back: under --medvram(-sdxl) the text part (SDXL: the whole `conditioner`; SD 2.x: the OpenCLIP model),
the VAE (its `encode`/`decode` are replaced by wrappers that move it first) and the UNet wrapper `model`; under
--lowvram the UNet's blocks one by one instead of the whole UNet. --medvram-sdxl applies only to models with a
`conditioner`. Applied at load, before the hijack; `sd_model.lowvram` tells whether it is on.
"""

from collections import namedtuple

import torch

from modules import devices, shared

module_in_gpu = None
cpu = torch.device("cpu")

ModuleWithParent = namedtuple("ModuleWithParent", ["module", "parent"], defaults=["None"])


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):
    flags = shared.cmd_opts
    return flags.lowvram or flags.medvram or (flags.medvram_sdxl and hasattr(sd_model, "conditioner"))


def apply(sd_model):
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def _parts_kept_in_ram(sd_model, is_sdxl, is_sd2):
    parts = [
        (sd_model, "first_stage_model"),
        (sd_model, "depth_model"),
        (sd_model, "embedder"),
        (sd_model, "model"),
    ]
    if hasattr(sd_model, "medvram_fields"):
        return sd_model.medvram_fields()
    if is_sdxl:
        return parts + [(sd_model, "conditioner")]
    if is_sd2:
        return parts + [(sd_model.cond_stage_model, "model")]
    return parts + [(sd_model.cond_stage_model, "transformer")]


def _move_root_without(sd_model, parts):
    """The model to the device, those parts left where they are (in RAM)."""
    stored = [getattr(owner, name, None) for owner, name in parts]
    for owner, name in parts:
        setattr(owner, name, None)
    sd_model.to(devices.device)
    for (owner, name), module in zip(parts, stored):
        setattr(owner, name, module)


def setup_for_low_vram(sd_model, use_medvram):
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True
    parents = {}

    def send_me_to_gpu(module, _inputs):
        global module_in_gpu
        module = parents.get(module, module)
        if module_in_gpu == module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    # The VAE is used through encode/decode, not forward, so a pre-hook alone would not fire.
    vae = sd_model.first_stage_model
    vae_encode, vae_decode = vae.encode, vae.decode

    def encode_on_device(x):
        send_me_to_gpu(vae, None)
        return vae_encode(x)

    def decode_on_device(z):
        send_me_to_gpu(vae, None)
        return vae_decode(z)

    is_sdxl = hasattr(sd_model, "conditioner")
    is_sd2 = not is_sdxl and hasattr(sd_model.cond_stage_model, "model")
    _move_root_without(sd_model, _parts_kept_in_ram(sd_model, is_sdxl, is_sd2))

    text_model = getattr(sd_model, "cond_stage_model", None)
    if text_model is not None and hasattr(text_model, "medvram_modules"):
        for entry in text_model.medvram_modules():
            module, parent = (
                (entry.module, entry.parent) if isinstance(entry, ModuleWithParent) else (entry, None)
            )
            if module:
                module.register_forward_pre_hook(send_me_to_gpu)
                if parent:
                    parents[module] = parent
    elif is_sdxl:
        sd_model.conditioner.register_forward_pre_hook(send_me_to_gpu)
    elif is_sd2:
        sd_model.cond_stage_model.model.register_forward_pre_hook(send_me_to_gpu)
        sd_model.cond_stage_model.model.token_embedding.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.model] = sd_model.cond_stage_model
        parents[sd_model.cond_stage_model.model.token_embedding] = sd_model.cond_stage_model
    else:
        sd_model.cond_stage_model.transformer.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.transformer] = sd_model.cond_stage_model

    vae.register_forward_pre_hook(send_me_to_gpu)
    vae.encode, vae.decode = encode_on_device, decode_on_device
    for name in ("depth_model", "embedder"):
        if getattr(sd_model, name, None) is not None:
            getattr(sd_model, name).register_forward_pre_hook(send_me_to_gpu)

    if use_medvram:
        sd_model.model.register_forward_pre_hook(send_me_to_gpu)
        return
    # --lowvram: the UNet is still too big, so its blocks take turns too.
    unet = sd_model.model.diffusion_model
    blocks = ("input_blocks", "middle_block", "output_blocks", "time_embed")
    _move_root_without(sd_model.model, [(unet, name) for name in blocks])
    unet.time_embed.register_forward_pre_hook(send_me_to_gpu)
    for block in unet.input_blocks:
        block.register_forward_pre_hook(send_me_to_gpu)
    unet.middle_block.register_forward_pre_hook(send_me_to_gpu)
    for block in unet.output_blocks:
        block.register_forward_pre_hook(send_me_to_gpu)


def is_enabled(sd_model):
    return sd_model.lowvram
