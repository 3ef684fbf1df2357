"""The memory plan (memory/plan.py) applied to the WebUI's SDXL (sgm `DiffusionEngine`), and undone after.

sgm's UNet and VAE are built from the same block classes as ldm's (CrossAttention, BasicTransformerBlock,
ResBlock, AttnBlock, with the same attributes), so the levers are ldm_memory's: instance-level attention
forwards, torch's non-reentrant checkpointing of the chosen UNet blocks, and (--medvram-sdxl) the WebUI's
placement taken over by `TrainingPlacement`, whose parts on the GPU are the UNet wrapper and `cond_stage_model`,
which for SDXL is the whole conditioner (both text encoders).

FP8 storage (the WebUI's "FP8 weight" setting) is kept: weights stored in float8 are never converted to the
plan's half precision (that would make a second, larger copy of them); they compute through the WebUI's
autocast (sgm_backend.py `compute_context`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ti_trainer.backends.ldm_memory import ldm_attention, ldm_checkpointing
from ti_trainer.memory.plan import MemoryPlan, on_device, weights_in


@contextlib.contextmanager
def sgm_memory_levers(model: torch.nn.Module, plan: MemoryPlan, keep_fp8: bool = False) -> Iterator[None]:
    """Apply `plan` to an SDXL `DiffusionEngine` for a `with` block, then undo every lever. With `keep_fp8`,
    the weights stay as the WebUI stores them (no half-precision copy)."""
    with contextlib.ExitStack() as levers:
        levers.enter_context(ldm_attention(model, plan.attention, plan.upcast_attention))
        levers.enter_context(ldm_checkpointing(model.model.diffusion_model, plan.checkpointing))
        if plan.weights_dtype is not None and not keep_fp8:
            # The VAE is never lowered: SDXL's overflows in fp16 (sgm_backend.encode_images keeps it in fp32).
            levers.enter_context(weights_in(plan.weights_dtype, model.model, model.conditioner))
        if plan.vae_offload:
            levers.enter_context(on_device(model.first_stage_model, "cpu"))
        yield
