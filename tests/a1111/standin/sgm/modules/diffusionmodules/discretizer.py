"""sgm.modules.diffusionmodules.discretizer: the DDPM schedule as noise levels.

`LegacyDDPMDiscretization()` with its defaults is what A1111's extend_sdxl takes `alphas_cumprod` from.
"""

import numpy as np
import torch

from ...util import append_zero
from .util import make_beta_schedule


def generate_roughly_equally_spaced_steps(num_substeps, max_step):
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization:
    def __call__(self, n, do_append_zero=True, device="cpu", flip=False):
        sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = append_zero(sigmas)
        return torch.flip(sigmas, (0,)) if flip else sigmas


class LegacyDDPMDiscretization(Discretization):
    def __init__(self, linear_start=0.00085, linear_end=0.0120, num_timesteps=1000):
        self.num_timesteps = num_timesteps
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)

    def get_sigmas(self, n, device="cpu"):
        if n > self.num_timesteps:
            raise ValueError(f"{n} steps asked of a {self.num_timesteps}-step schedule")
        chosen = self.alphas_cumprod
        if n < self.num_timesteps:
            chosen = chosen[generate_roughly_equally_spaced_steps(n, self.num_timesteps)]
        sigmas = torch.tensor((1 - chosen) / chosen, dtype=torch.float32, device=device) ** 0.5
        return torch.flip(sigmas, (0,))  # highest noise first
