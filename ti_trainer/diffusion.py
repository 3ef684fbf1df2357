"""The denoising objective the loop optimises: the noise schedule and parameterization are data.

Same loss as ldm's `LatentDiffusion.forward` that A1111 trains with: t ~ U{0..999}, x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) noise, target = noise (eps) or sqrt(a_t) noise - sqrt(1 - a_t) x0 (v), plain MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # [T] float64 or float32, on CPU
    parameterization: str  # "eps" | "v"

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])


def scaled_linear_schedule(
    parameterization: str, beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000
) -> NoiseSchedule:
    """Stable Diffusion's schedule (ldm "linear", diffusers "scaled_linear"), computed in float64 like ldm."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0), parameterization)


def noisy_latents_and_target(
    schedule: NoiseSchedule, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    alphas = schedule.alphas_cumprod.to(latents.device)[timesteps].float()
    signal = alphas.sqrt().view(-1, 1, 1, 1)
    sigma = (1.0 - alphas).sqrt().view(-1, 1, 1, 1)
    noisy = signal * latents + sigma * noise
    if schedule.parameterization == "v":
        target = signal * noise - sigma * latents
    elif schedule.parameterization == "eps":
        target = noise
    else:
        raise ValueError(f"unknown parameterization {schedule.parameterization!r}")
    return noisy, target


def denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in fp32; with a weight map (PNG alpha) each element is weighted, as in A1111."""
    error = (prediction.float() - target.float()) ** 2
    if weight is not None:
        error = error * weight.to(error.device, error.dtype)
    return error.mean()
