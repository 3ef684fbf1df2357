"""What a backend gives the training core. A small object with a few methods, not a base class with hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.text.conditioning import PromptEncoder


@dataclass
class LatentDistribution:
    """The VAE's latent distribution for a batch, already multiplied by the model's scale factor."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return self.mean + self.std * noise


@dataclass
class PreviewRequest:
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    sampler: str
    vectors: dict[str, torch.Tensor]


class Backend(Protocol):
    device: torch.device
    schedule: NoiseSchedule
    text_width: int
    prompt_encoder: PromptEncoder
    model_name: str
    model_hash: str | None

    def token_vectors(self, text: str) -> torch.Tensor:
        """Token embeddings (not contextualised) of `text`'s tokens, no start/end: `[tokens, width]`."""

    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        """`pixels` `[B, 3, H, W]` in [-1, 1] -> scaled latent distribution, no gradients."""

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's prediction (noise or v, per the schedule's parameterization)."""

    def render(self, request: PreviewRequest) -> Image.Image:
        """Generate one image for a preview."""

    # Optional, read with getattr by the memory plan and the loop (ti_trainer/memory.py, training/loop.py):
    #   upcasts_attention: bool            the model wants fp32 attention scores (SD 2.x)
    #   preferred_precision: str | None    the half precision its weights already have (the WebUI's fp16)
    #   memory_levers(plan) -> context     apply a MemoryPlan for a run and undo it
    #   previewing() -> context            take back what was lent out while training (VAE in RAM) for a preview
    #   training_session() -> context      freeze and restore a host's model around a run
