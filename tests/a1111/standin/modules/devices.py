"""modules.devices: where the WebUI runs its model. The tests run on the CPU in float32 (like --use-cpu all)."""

import contextlib

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False  # set at model load when the "FP8 weight" setting applies (sd_models.check_fp8)


def cond_cast_unet(tensor):
    # A1111 casts an embedding's vectors to the UNet dtype only when upcasting; otherwise leaves them as they are.
    return tensor.to(dtype_unet) if unet_needs_upcast else tensor


def torch_gc():
    pass


def autocast(disable=False):
    """What generation runs under. Stand-in: float32 on the CPU, so nothing, except for FP8-stored weights,
    which A1111 computes under bfloat16 CPU autocast (its manual-cast and CUDA branches need a GPU)."""
    if disable:
        return contextlib.nullcontext()
    if fp8 and device == cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
    return contextlib.nullcontext()
