"""modules.devices: where the WebUI runs its model. The tests run on the CPU in float32 (like --use-cpu all)."""

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
unet_needs_upcast = False


def cond_cast_unet(tensor):
    # A1111 casts an embedding's vectors to the UNet dtype only when upcasting; otherwise leaves them as they are.
    return tensor.to(dtype_unet) if unet_needs_upcast else tensor


def torch_gc():
    pass
