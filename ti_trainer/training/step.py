"""One training micro-step's loss: the one place the denoising objective meets the model.

The loop, the fit probe, the validation batch, the per-image report and the benchmark all call `step_loss`,
so what they measure is what training optimises: the same noising, the same prompt encoding with the
vectors injected, the same autocast, the same loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ti_trainer.diffusion import denoising_loss, noisy_latents_and_target
from ti_trainer.memory.precision import autocast
from ti_trainer.text.conditioning import VectorsByName

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend


def step_loss(
    backend: Backend,
    prompts: list[str],
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    weights: torch.Tensor | None,
    vectors_by_name: VectorsByName | list[VectorsByName],
    precision: str,
    per_sample: bool = False,
) -> torch.Tensor:
    """The denoising loss of one micro-batch, in fp32: its mean (the training loss), or per sample `[B]`.

    `latents`, `noise` `[B, C, h, w]` and `timesteps` `[B]` on any device; `weights` the PNG-alpha loss
    weights `[B, C, h, w]` or None; `precision` the run's resolved precision ("fp32" | "bf16" | "fp16", the
    memory plan's). `vectors_by_name` maps each embedding's name in the prompts to its vectors (a tensor, or
    for a family with several text encoders one per encoder key: embeddings/vectors.py); a list gives
    every prompt its own (the per-image report: each copy then holds its own sample's gradient), and those
    prompts are encoded one by one, so they must take the same number of 75-token chunks.
    """
    device = backend.device
    timesteps = timesteps.to(device)
    noisy, target = noisy_latents_and_target(
        backend.schedule, latents.to(device), noise.to(device), timesteps
    )
    with autocast(precision, device):
        if isinstance(vectors_by_name, list):
            cond = backend.prompt_encoder.concat(
                [backend.prompt_encoder([prompt], own) for prompt, own in zip(prompts, vectors_by_name)]
            )
        else:
            cond = backend.prompt_encoder(prompts, vectors_by_name)
        prediction = backend.predict(noisy, timesteps, cond)
    if not per_sample:
        return denoising_loss(prediction, target, weights)
    error = (prediction.float() - target.float()) ** 2
    if weights is not None:
        error = error * weights.to(error.device, error.dtype)
    # Each sample's mean: over a batch of one size, their mean is exactly the training loss.
    return error.flatten(1).mean(dim=1)
