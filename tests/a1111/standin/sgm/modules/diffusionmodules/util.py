"""sgm.modules.diffusionmodules.util: the noise schedule and the sinusoidal embedding of numbers."""

import math

import torch


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2):
    # sgm's "linear" is linear in sqrt(beta) ("scaled linear"), computed in float64.
    if schedule != "linear":
        raise NotImplementedError(schedule)
    roots = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64)
    return (roots**2).numpy()


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """[N] numbers -> [N, dim]: cosines of the first half of the frequencies, then sines (a zero column pads
    an odd dim)."""
    if repeat_only:
        return timesteps[:, None].expand(-1, dim)
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(max_period) * exponents).to(timesteps.device)
    angles = timesteps[:, None].float() * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
