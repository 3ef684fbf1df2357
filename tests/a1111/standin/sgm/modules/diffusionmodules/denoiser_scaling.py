"""sgm.modules.diffusionmodules.denoiser_scaling: (c_skip, c_out, c_in, c_noise) for a noise level sigma.
A1111's extend_sdxl reads the class: VScaling means v-prediction, anything else eps."""

import torch


class EpsScaling:
    def __call__(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1.0) ** 0.5, sigma.clone()


class VScaling:
    def __call__(self, sigma):
        variance = sigma**2 + 1.0
        return 1.0 / variance, -sigma / variance**0.5, 1.0 / variance**0.5, sigma.clone()
