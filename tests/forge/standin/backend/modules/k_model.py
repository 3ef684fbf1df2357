"""backend.modules.k_model.KModel: the UNet with its predictor, called the k-diffusion way (Forge:
backend/modules/k_model.py).

`diffusion_model` is the UNet, `predictor` the schedule, `storage_dtype` / `computation_dtype` the UNet's.
`apply_model(x, t=sigma, c_crossattn=...)` scales the input, maps sigma to the nearest step, casts to the
computation dtype, runs the UNet and returns the denoised x0. `memory_required(shape)` is Forge's estimate of
one forward's activations (its SDPA/xformers scaler).
"""

# ruff: noqa: B006  (Forge's signatures take `transformer_options={}`, and its UNet writes into it: kept as is)

import torch

from backend import memory_management
from backend.modules.k_prediction import k_prediction_from_diffusers_scheduler


class KModel(torch.nn.Module):
    def __init__(self, model, diffusers_scheduler, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = k_predictor or k_prediction_from_diffusers_scheduler(diffusers_scheduler)

    def apply_model(
        self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs
    ):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        dtype = self.computation_dtype
        xc = xc.to(dtype)
        t = self.predictor.timestep(t).float()
        context = c_crossattn.to(dtype)
        extra = {
            key: value.to(dtype) if getattr(value, "is_floating_point", lambda: False)() else value
            for key, value in kwargs.items()
        }
        out = self.diffusion_model(
            xc, t, context=context, control=control, transformer_options=transformer_options, **extra
        ).float()
        return self.predictor.calculate_denoised(sigma, out, x)

    def memory_required(self, input_shape):
        area = input_shape[0] * input_shape[2] * input_shape[3]
        return 1.28 * area * memory_management.dtype_size(self.computation_dtype) * 16384
