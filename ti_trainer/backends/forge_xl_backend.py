"""Forge's SDXL backend: training on the `StableDiffusionXL` Forge has loaded (reference/forge.md), in place.

It holds a `ForgeLoan` of Forge's model (backends/forge_loan.py), as ForgeBackend (SD 1.x / 2.x,
backends/forge_backend.py) does: its patchers, its memory management (UNet and both text encoders asked for
together, with room for the backward pass), the session that makes the inference-mode weights trainable and
gives everything back as found, the VAE's distribution through Forge's patcher and scale (in the VAE dtype
Forge chose: fp32, or bf16 where it prefers it; never fp16 unless asked for with --vae-in-fp16, as for its own
generations). What SDXL changes:

- Text: Forge's two engines, `text_processing_engine_l` (clip_l) and `text_processing_engine_g` (clip_g), as
  text/multi_encoder.py runs them: our chunker over the clip_l engine's tokenizer and ids (the two share CLIP's
  BPE; clip_g pads with 0 after the first end token, as its engine does), each chunk through each engine's own
  `encode_with_transformers` (its clip skip, at least 2, no final norm; clip_g's pooled output through its
  `text_projection`), the vectors handed to each engine's token-embedding wrapper as an embedding's `vec` would
  be (`embeddings.fixes`: clip_l's part to the one, clip_g's to the other), emphasis per engine on the hidden
  states only. Not through the model's `get_learned_conditioning`: it runs in inference mode, so no gradient
  would reach the vectors.
- The UNet's vector input: the pooled text, then Forge's own size embedder (`model.embedder`, `Timestep(256)`)
  of height, width, crop top, crop left, target height, target width, as Forge's `get_learned_conditioning`
  computes it for a generation at the trained image's size: original = target = (height, width) in pixels,
  crop = the "sdxl_crop_top"/"sdxl_crop_left" settings (docs/sdxl.md).
- UNet: `diffusion_model(x_t, t, context=crossattn, y=vector)`, the raw eps/v output (A1111's TI loss).

Refused with a message: Forge's SDXL refiner (one text engine, an aesthetic score in its vector) and inpainting
models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch

from ti_trainer.backends.contract import CLIP_G, CLIP_L, PreviewRequest, sdxl_family
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
from ti_trainer.text.multi_encoder import EncoderPath, MultiEncoderPromptEncoder, TextConditioning

ENGINE_ATTRIBUTES = {CLIP_L: "text_processing_engine_l", CLIP_G: "text_processing_engine_g"}


class ForgeXLBackend:
    """The contract (backends/contract.py `Backend`) over Forge's loaded SDXL base model."""

    def __init__(
        self,
        model,
        memory_management: ModuleType,
        *,
        emphasis: str = "Original",
        clip_skip: int = 1,
        crop_top_left: tuple[int, int] = (0, 0),
        model_name: str = "",
        model_hash: str | None = None,
        step_memory: Callable[..., int] | None = None,
    ):
        """As ForgeBackend's; `crop_top_left` is Forge's "sdxl_crop_top" and "sdxl_crop_left" settings (its
        "Clip skip" applies to both engines, as its txt2img sets it)."""
        _check_supported(model)
        self.text_engines = {key: getattr(model, name) for key, name in ENGINE_ATTRIBUTES.items()}
        self.loan = loan = ForgeLoan(
            model, memory_management, list(self.text_engines.values()), clip_skip, bound(step_memory, self)
        )
        # The contract's members the loan fills alike for both Forge backends (backends/forge_loan.py).
        self.device, self.schedule = loan.device, loan.schedule
        self.training_session, self.previewing = loan.training_session, loan.previewing
        self.memory_levers, self.encode_images = loan.memory_levers, loan.encode_images
        self.describe_memory = loan.describe_memory
        self.model_name, self.model_hash = model_name, model_hash
        self.crop_top_left = tuple(int(value) for value in crop_top_left)
        paths = [
            EncoderPath(
                key, EngineFixes(engine.embeddings), functools.partial(self._encode_xl, engine), engine.id_pad
            )
            for key, engine in self.text_engines.items()
        ]
        self.prompt_encoder = MultiEncoderPromptEncoder(
            engine_chunker(self.text_engines[CLIP_L], emphasis), paths, self.device
        )
        widths = {key: token_table(engine).weight.shape[1] for key, engine in self.text_engines.items()}
        self.family = sdxl_family(widths[CLIP_L], widths[CLIP_G], vae_scale_factor=loan.vae.downscale_ratio)
        self.text_width = self.family.text_width

    # Attention precision is Forge's own setting (its attention backend), left as it is.
    upcasts_attention = False
    lends_text_encoders = False  # Forge's memory manager places its text encoders itself

    @property
    def preferred_precision(self) -> str | None:
        return self.loan.preferred_precision

    # --- text ------------------------------------------------------------------------------------------------

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Each engine's token embeddings of `text` (the same ids: the tokenizers share CLIP's BPE)."""
        ids = self.text_engines[CLIP_L].tokenize([text])[0]
        return {key: token_rows(engine, ids) for key, engine in self.text_engines.items()}

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        self.family.encoder(encoder)
        return token_table(self.text_engines[encoder]).weight

    def _encode_xl(self, engine, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One engine's hidden states and, for clip_g, its projected pooled output (Forge hangs it on z)."""
        z = self.loan.engine_forward(engine, tokens)
        return z, getattr(z, "pooled", None)

    # --- the UNet's vector input ---------------------------------------------------------------------------

    def size_embedding(self, height_px: int, width_px: int) -> torch.Tensor:
        """Forge's size and crop conditioning for an image of this size, `[1, 6 * features]` fp32: its own
        embedder over height, width, crop top, crop left, target height, target width."""
        crop_top, crop_left = self.crop_top_left
        numbers = [height_px, width_px, crop_top, crop_left, height_px, width_px]
        embedded = [self.loan.model.embedder(torch.tensor([float(number)])) for number in numbers]
        return torch.cat(embedded).flatten().unsqueeze(0)

    def unet_conditioning(
        self, cond: TextConditioning, height_px: int, width_px: int
    ) -> dict[str, torch.Tensor]:
        """What Forge's `get_learned_conditioning` returns for these prompts at this image size: `crossattn`
        (both engines' hidden states) and `vector` (the pooled text, then the size embedding)."""
        sizes = self.size_embedding(height_px, width_px).to(cond.pooled)
        vector = torch.cat([cond.pooled, sizes.repeat(cond.pooled.shape[0], 1)], dim=1)
        return {"crossattn": cond.hidden, "vector": vector}

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning
    ) -> torch.Tensor:
        """The UNet's raw output with the size conditioning of the latents' size."""
        factor = self.family.vae_scale_factor
        height, width = noisy_latents.shape[-2] * factor, noisy_latents.shape[-1] * factor
        conditioning = self.unet_conditioning(cond, height, width)
        return self.loan.unet_forward(
            noisy_latents, timesteps, conditioning["crossattn"], y=conditioning["vector"]
        )

    def render(self, request: PreviewRequest) -> None:
        """None: in Forge, previews go through its own txt2img (host/forge.py `render_preview`)."""
        return None


def _check_supported(model) -> None:
    if getattr(model, "forge_objects", None) is None or not getattr(model, "is_sdxl", False):
        raise ValueError("ForgeXLBackend trains Forge's SDXL; SD 1.x / 2.x take ForgeBackend")
    if not all(hasattr(model, name) for name in ENGINE_ATTRIBUTES.values()):
        raise UserError(
            "The loaded model is an SDXL refiner (one text encoder, OpenCLIP bigG): embeddings for SDXL are "
            "trained on the SDXL base model, and work with the refiner's bigG afterwards. Load an SDXL base "
            "checkpoint in the checkpoint list at the top of the page and try again."
        )
    check_trainable(model)
