"""The memory plan (memory/plan.py) applied to diffusers models, and undone afterwards. diffusers 0.27 to 0.42.

- Attention: diffusers' own processors (AttnProcessor2_0 for SDPA, XFormersAttnProcessor) in the UNet and the
  VAE; when fp32 scores are wanted, or for the plain math path, `TrainingAttnProcessor` (same maths, through
  memory.attention), since diffusers' SDPA processor ignores the model's `upcast_attention`.
- Checkpointing: the blocks' own `gradient_checkpointing` flags. They must engage on a frozen model in eval
  mode: diffusers 0.27 gates them on `self.training` (so the chosen blocks' own `training` flag is set, not
  their children's, which keep eval behaviour), later versions on `torch.is_grad_enabled()` and call
  `self._gradient_checkpointing_func`, which only `enable_gradient_checkpointing` would set. Both are set
  here, with torch's non-reentrant checkpoint, which works when no weight requires a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils.checkpoint

from ti_trainer.memory.plan import MemoryPlan, attention, on_device, weights_in

_MISSING = object()


class TrainingAttnProcessor:
    """A diffusers attention processor computing through memory.attention (SDPA / xformers / math), with
    optional fp32 scores. Same inputs and outputs as diffusers' AttnProcessor2_0."""

    def __init__(self, kind: str = "sdpa", upcast: bool = False):
        self.kind, self.upcast = kind, upcast

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, source_length = source.shape[0], source.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        hidden_states = attention(query, key, value, self.kind, self.upcast, attention_mask)
        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_processor(kind: str, upcast: bool):
    """The processor for one plan: diffusers' own where it does what the plan asks, ours otherwise."""
    if not upcast and kind == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()
    if not upcast and kind == "xformers":
        from diffusers.models.attention_processor import XFormersAttnProcessor

        return XFormersAttnProcessor()
    return TrainingAttnProcessor(kind, upcast)


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """diffusers' `Attention` modules in `model` (anything with a swappable processor)."""
    return [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


@contextlib.contextmanager
def attention_processors(model: torch.nn.Module, kind: str, upcast: bool) -> Iterator[None]:
    layers = attention_layers(model)
    saved = [layer.processor for layer in layers]
    processor = attention_processor(kind, upcast)
    try:
        for layer in layers:
            layer.set_processor(processor)
        yield
    finally:
        for layer, original in zip(layers, saved):
            layer.set_processor(original)


def checkpointed_blocks(unet: torch.nn.Module, level: str) -> list[torch.nn.Module]:
    if level == "off":
        return []
    if level == "high-res":
        return [unet.down_blocks[0], unet.up_blocks[-1]]
    if level == "all":
        return [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    raise ValueError(f"unknown checkpointing level {level!r}")


def _checkpoint(module, *args):
    # What diffusers' enable_gradient_checkpointing installs; non-reentrant: frozen weights are fine.
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


@contextlib.contextmanager
def unet_checkpointing(unet: torch.nn.Module, level: str) -> Iterator[list[torch.nn.Module]]:
    """Checkpoint the UNet blocks of `level` for a `with` block; yields the modules whose flag was set."""
    flagged = [
        module
        for block in checkpointed_blocks(unet, level)
        for module in block.modules()
        if hasattr(module, "gradient_checkpointing")
    ]
    saved = [
        (m, m.gradient_checkpointing, m.training, m.__dict__.get("_gradient_checkpointing_func", _MISSING))
        for m in flagged
    ]
    try:
        for module in flagged:
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = _checkpoint
            module.training = True  # this module's flag only (not .train()): its children stay in eval mode
        yield flagged
    finally:
        for module, flag, training, function in saved:
            module.gradient_checkpointing, module.training = flag, training
            if function is _MISSING:
                module.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                module._gradient_checkpointing_func = function


@contextlib.contextmanager
def diffusers_memory_levers(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, plan: MemoryPlan
) -> Iterator[None]:
    """Apply `plan` to a diffusers UNet / VAE / text encoder for a `with` block, then undo every lever.

    The text encoder stays on the GPU: the embedding's gradient flows through it every step.
    """
    with contextlib.ExitStack() as levers:
        levers.enter_context(attention_processors(unet, plan.attention, plan.upcast_attention))
        levers.enter_context(attention_processors(vae, plan.attention, plan.upcast_attention))
        levers.enter_context(unet_checkpointing(unet, plan.checkpointing))
        if plan.weights_dtype is not None:
            levers.enter_context(weights_in(plan.weights_dtype, unet, text_encoder))
        if plan.vae_offload:
            levers.enter_context(on_device(vae, "cpu"))
        yield
