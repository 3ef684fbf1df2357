"""Forge's backend: training on the model Forge has loaded (reference/forge.md), in place, with no copy.

SD 1.x and SD 2.x here; SDXL in backends/forge_xl_backend.py. Both hold a `ForgeLoan` (backends/forge_loan.py)
of Forge's model: its patchers and schedule, the UNet called directly for its raw eps/v output, the VAE's
distribution through Forge's patcher, the memory asked of Forge's memory management with room for the backward
pass, and the session that makes Forge's inference-mode weights trainable and gives everything back as found.
What this backend adds is its text:

- Forge's own text engine (`text_processing_engine`), so conditioning is what Forge computes at generation
  time. Prompts are chunked by conditioning.py's chunker over the engine's tokenizer and ids (Forge's chunking
  is A1111's, with the comma back-off fixed at 20), each chunk goes through the engine's
  `encode_with_transformers` (its clip skip, final norm and fp32 embeddings), and the trainable vectors go in
  through Forge's own wrapper of the token embedding, as an embedding's would: `embeddings.fixes` holds
  (offset, object with `.vec`) per prompt, and the wrapper concatenates `.vec` into the row, so gradient
  reaches it. The emphasis step is conditioning.py's, with the engine's option.
- The UNet takes the text's hidden states as its context, and nothing else.

`memory_management` is Forge's module, handed in by host/forge.py; nothing here imports Forge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

from ti_trainer.backends.contract import PreviewRequest, sd_family
from ti_trainer.backends.forge_loan import (
    EngineFixes,
    ForgeLoan,
    bound,
    check_trainable,
    engine_chunker,
    token_rows,
    token_table,
)
from ti_trainer.errors import UserError
from ti_trainer.text.conditioning import PromptEncoder


class ForgeBackend:
    """The contract (backends/contract.py `Backend`) over Forge's loaded SD 1.x / 2.x model."""

    def __init__(
        self,
        model,
        memory_management: ModuleType,
        *,
        emphasis: str = "Original",
        clip_skip: int = 1,
        model_name: str = "",
        model_hash: str | None = None,
        step_memory: Callable[..., int] | None = None,
    ):
        """`model` is Forge's loaded model (`shared.sd_model` after `forge_model_reload()`);
        `memory_management` is Forge's `backend.memory_management`; `emphasis` and `clip_skip` are its
        "Emphasis mode" and "Clip skip" settings, as its txt2img applies them; `step_memory(plan, latent_shape,
        backend)` is the host's estimate of the room a step needs beyond the weights (backends/forge_loan.py)."""
        _check_supported(model)
        self.engine = engine = model.text_processing_engine
        self.loan = loan = ForgeLoan(model, memory_management, [engine], clip_skip, bound(step_memory, self))
        # The contract's members the loan fills alike for both Forge backends (backends/forge_loan.py).
        self.device, self.schedule = loan.device, loan.schedule
        self.training_session, self.previewing = loan.training_session, loan.previewing
        self.memory_levers, self.encode_images = loan.memory_levers, loan.encode_images
        self.describe_memory = loan.describe_memory
        self.model_name, self.model_hash = model_name, model_hash
        # The fixes adapter stands where conditioning.py's own injector would: Forge's wrapper injects.
        self.prompt_encoder = PromptEncoder(
            engine_chunker(engine, emphasis),
            EngineFixes(engine.embeddings),
            functools.partial(loan.engine_forward, engine),
            self.device,
        )
        self.family = sd_family(
            "sd2" if model.is_sd2 else "sd1",
            text_width=token_table(engine).weight.shape[1],
            latent_channels=loan.vae.latent_channels,
            vae_scale_factor=loan.vae.downscale_ratio,
        )
        self.text_width = self.family.text_width

    # Attention precision is Forge's own setting (its attention backend), left as it is.
    upcasts_attention = False
    lends_text_encoders = False  # Forge's memory manager places its text encoders itself

    @property
    def preferred_precision(self) -> str | None:
        return self.loan.preferred_precision

    def token_vectors(self, text: str) -> torch.Tensor:
        return token_rows(self.engine, self.engine.tokenize([text])[0])

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        """The text model's token-embedding matrix, under Forge's textual-inversion wrapper."""
        self.family.encoder(encoder)
        return token_table(self.engine).weight

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        return self.loan.unet_forward(noisy_latents, timesteps, cond)

    def render(self, request: PreviewRequest) -> None:
        """None: in Forge, previews go through its own txt2img (host/forge.py `render_preview`)."""
        return None


def _check_supported(model) -> None:
    if getattr(model, "is_sdxl", False):  # host/forge.py hands SDXL to ForgeXLBackend
        raise ValueError("ForgeBackend trains Forge's SD 1.x / 2.x; SDXL takes ForgeXLBackend")
    if getattr(model, "forge_objects", None) is None or not hasattr(model, "text_processing_engine"):
        raise UserError(
            "The loaded model is not one Forge's SD 1.x / SD 2.x / SDXL classes built (a Flux, SD3 or other "
            "model, or none). Load an SD 1.x, SD 2.x or SDXL checkpoint at the top of the page and try again."
        )
    check_trainable(model)
