"""The memory plan (memory/plan.py) applied to the WebUI's SDXL (sgm `DiffusionEngine`), and undone after.

sgm's UNet and VAE are built from the same block classes as ldm's (CrossAttention, BasicTransformerBlock,
ResBlock, AttnBlock, with the same attributes), so the levers are ldm_memory's: instance-level attention
forwards, torch's non-reentrant checkpointing of the chosen UNet blocks, and (--medvram-sdxl) the WebUI's
placement taken over (`SdxlTrainingPlacement`): the UNet on the GPU for the run, the text encoders there only
for their own forward and backward, the VAE in RAM. Without --medvram-sdxl the plan's `text_encoders_lent`
does the same for the text encoders: the conditioner waits in RAM for the run (here), and the backend lends
each encoder for its forward (sgm_backend.py `_run`).

FP8 storage (the WebUI's "FP8 weight" setting) is kept: weights stored in float8 are never converted to the
plan's half precision (that would make a second, larger copy of them); they compute through the WebUI's
autocast (sgm_backend.py `compute_context`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ti_trainer.backends.ldm_memory import TrainingPlacement, ldm_attention, ldm_checkpointing
from ti_trainer.memory.plan import MemoryPlan, on_device, weights_in


@contextlib.contextmanager
def sgm_memory_levers(model: torch.nn.Module, plan: MemoryPlan, keep_fp8: bool = False) -> Iterator[None]:
    """Apply `plan` to an SDXL `DiffusionEngine` for a `with` block, then undo every lever. With `keep_fp8`,
    the weights stay as the WebUI stores them (no half-precision copy)."""
    with contextlib.ExitStack() as levers:
        levers.enter_context(ldm_attention(model, plan.attention, plan.upcast_attention))
        levers.enter_context(ldm_checkpointing(model.model.diffusion_model, plan.checkpointing))
        if plan.text_encoders_lent:
            # First, so that their half-precision copies below are made in RAM, never on the GPU.
            levers.enter_context(on_device(model.conditioner, "cpu"))
        if plan.weights_dtype is not None and not keep_fp8:
            # The VAE is never lowered: SDXL's overflows in fp16 (sgm_backend.encode_images keeps it in fp32).
            levers.enter_context(weights_in(plan.weights_dtype, model.model, model.conditioner))
        if plan.vae_offload:
            levers.enter_context(on_device(model.first_stage_model, "cpu"))
        yield


# --- placement under --medvram-sdxl: the text encoders on the GPU only for their forward and backward ------------


class SdxlTrainingPlacement(TrainingPlacement):
    """`TrainingPlacement` for SDXL under --medvram-sdxl (or --medvram/--lowvram): the UNet on the GPU for the
    run, the VAE and both text encoders in RAM. Each text encoder comes to the GPU for its own forward
    (memory/plan.py `text_encoder_lent`), and what its backward needs waits in RAM meanwhile, so at the
    UNet's peak the GPU holds the UNet and its activations alone (bigG is ~1.4 GB of fp16 weights: a sixth
    of 8 GB)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str):
        super().__init__(model, device)
        self.text_device = torch.device("cpu")

    @property
    def parts_on_device(self) -> list[torch.nn.Module]:
        return [self.model.model]

    def _take_over(self) -> None:
        super()._take_over()
        self.model.conditioner.to(self.text_device)  # lowvram may have left it on the GPU last
