"""The memory levers of a training run, as one plan: chosen from the device and the model, shown in words.

A `MemoryPlan` says how a run saves GPU memory; each backend applies it to its own model for the duration
of the run and undoes it afterwards (`backend.memory_levers(plan)`: backends/diffusers_memory.py for the
standalone models, backends/ldm_memory.py and backends/sgm_memory.py for A1111's, backends/forge_memory.py for
Forge's, which keeps Forge's own attention and weights). Why each lever (DESIGN.md, "Memory and speed"):

- attention: PyTorch SDPA (or xformers) never materialises the tokens x tokens score matrix. At 768 px
  the math path holds ~0.85 GB per self-attention layer per image for the backward pass.
- gradient checkpointing: recomputes a block's activations during the backward pass instead of storing them;
  ~50% more compute when every block is checkpointed, so it is raised only when the batch needs it (fit.py).
- VAE offload: latents are cached before training, so the VAE can wait in RAM.
- precision: bf16 autocast where the GPU has it (fp32's range, so no loss scaling); fp16 with a loss scaler
  elsewhere. Frozen weights are stored in that dtype too: they never learn, so nothing needs their fp32 copy.
- fp32 attention scores: SD 2.1's attention logits overflow fp16 (the NaN of A1111 #5715). bf16 has fp32's
  exponent range, so the upcast is only needed, and only applied by default, under fp16.
- text encoders lent (SDXL): both encoders wait in RAM for the run and each comes to the GPU only for its
  own forward; what its backward needs waits in RAM meanwhile (`text_encoder_lent`). At 1024 px that takes
  their ~1.5 GiB of fp16 weights off the UNet's peak: what makes batch 2 fit in 8 GB (docs/benchmarks.md).
  Raised by need like checkpointing, and before it (`escalation` says why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ti_trainer.config import ATTENTION_CHOICES, CHECKPOINTING_CHOICES, LENDING_CHOICES, TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.memory.precision import resolve_precision
from ti_trainer.memory.saved_in_ram import saved_in_ram

ATTENTION_KINDS = ATTENTION_CHOICES[1:]  # without "auto"
# Which UNet blocks are checkpointed: none, those at the highest resolution (the first down block and the
# last up block, where activations are largest), or every down, middle and up block.
CHECKPOINT_LEVELS = CHECKPOINTING_CHOICES[1:]
CHECKPOINTING_WORDS = {
    "off": "checkpointing off",
    "high-res": "checkpointing of the high-resolution UNet blocks",
    "all": "checkpointing of every UNet block",
}
PRECISION_WORDS = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16 with loss scaling"}


@dataclass(frozen=True)
class MemoryPlan:
    attention: str = "sdpa"
    checkpointing: str = "off"
    vae_offload: bool = False
    precision: str = "fp32"  # resolved: "fp32" | "bf16" | "fp16"
    upcast_attention: bool = False
    half_weights: bool = False  # frozen weights stored in the autocast dtype while training
    text_encoders_lent: bool = False  # in RAM for the run, on the GPU only for their own forward and backward

    @property
    def weights_dtype(self) -> torch.dtype | None:
        """The dtype frozen weights are stored in while training; None keeps them as they are."""
        if not self.half_weights or self.precision == "fp32":
            return None
        return torch.bfloat16 if self.precision == "bf16" else torch.float16

    def describe(self) -> str:
        """The plan in words, for the UI and the run's log."""
        attention = {"sdpa": "SDPA", "xformers": "xformers", "math": "plain (math)"}[self.attention]
        attention += " attention" + (" (scores in fp32)" if self.upcast_attention else "")
        vae = "VAE in RAM while training" if self.vae_offload else "VAE stays where it is"
        if self.text_encoders_lent:
            vae += ", text encoders in RAM (on the GPU only for their own forward and backward)"
        precision = self.precision_words
        if self.weights_dtype is not None:
            precision += " (weights too)"
        return f"{attention}, {self.checkpointing_words}, {vae}, {precision}"

    @property
    def checkpointing_words(self) -> str:
        """The checkpointing lever in words (a part of `describe`, and of a host's own line: Forge's)."""
        return CHECKPOINTING_WORDS[self.checkpointing]

    @property
    def precision_words(self) -> str:
        """The precision computed in, in words (without the weights' storage, which a host may keep)."""
        return PRECISION_WORDS[self.precision]

    def with_checkpointing(self, level: str) -> MemoryPlan:
        return dataclasses.replace(self, checkpointing=level)


def escalation(plan: MemoryPlan, *, checkpointing: bool, lending: bool) -> list[MemoryPlan]:
    """The plans "auto" may raise `plan` to, least costly first: the fit finder probes them in this order and
    the estimate starts it at the first it says fits. `checkpointing`: the level is "auto" (all levels);
    `lending`: lending the text encoders is "auto" and the model can (both keep `plan`'s own otherwise).

    At each checkpointing level the text encoders are lent before the next level is tried. Lending costs
    copies whatever the batch: the encoders' weights (~1.6 GB of fp16 for SDXL's two) to the GPU for the
    forward, those the backward multiplies by (~1.4 GB: all but the token tables) again from RAM for the
    backward, and the few activations of 77-token prompts out to RAM and back: ~3 GB over PCIe per step
    (`text_encoder_lent` has the arithmetic), a few tenths of a second (not yet measured on a GPU). Checkpointing costs
    recomputation that grows with the batch and the image: "all" is one more UNet forward per image, about
    a third more time per step; at SDXL's 1024 px roughly what the copies cost at batch 1 on an 8 GB card's
    GPU, and more with every image after (arithmetic, not yet measured). And on SDXL lending frees about as
    much as a level does (its high-resolution blocks have no attention, so "high-res" frees little)."""
    levels = CHECKPOINT_LEVELS if checkpointing else (plan.checkpointing,)
    lent = (False, True) if lending else (plan.text_encoders_lent,)
    return [
        dataclasses.replace(plan, checkpointing=level, text_encoders_lent=each)
        for level in levels
        for each in lent
    ]


@functools.lru_cache(maxsize=1)
def xformers_available() -> bool:
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # a broken install (wrong torch) fails in many ways; then it is simply not there
        return False
    return True


def choose_memory_plan(
    device: torch.device | str,
    *,
    precision: str = "auto",
    attention: str = "auto",
    checkpointing: str = "auto",
    vae_offload: bool = True,
    upcast_attention: str = "auto",
    model_upcasts_attention: bool = False,
    lend_text_encoders: str = "off",
) -> MemoryPlan:
    """The default plan for `device`; "auto" checkpointing and lending start "off" (fit.py raises them by
    need). Off a GPU the text encoders are never lent: they are in RAM already.

    `model_upcasts_attention`: the model wants fp32 attention scores (SD 2.x; diffusers' `upcast_attention`).
    """
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if attention == "auto":
        attention = "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    elif attention == "xformers" and not xformers_available():
        raise UserError(
            "Attention 'xformers' was chosen but xformers is not installed (or does not load with this torch). "
            "Choose 'auto' or 'sdpa': PyTorch's own memory-efficient attention saves as much."
        )
    if attention not in ATTENTION_KINDS:
        raise UserError(f"Attention must be one of auto, {', '.join(ATTENTION_KINDS)} (got {attention!r}).")
    if checkpointing == "auto":
        checkpointing = "off"
    if checkpointing not in CHECKPOINT_LEVELS:
        raise UserError(
            f"Gradient checkpointing must be one of auto, {', '.join(CHECKPOINT_LEVELS)} (got {checkpointing!r})."
        )
    if lend_text_encoders not in LENDING_CHOICES:
        raise UserError(
            f"Lending the text encoders must be one of {', '.join(LENDING_CHOICES)} (got {lend_text_encoders!r})."
        )
    if upcast_attention == "auto":
        upcast = model_upcasts_attention and resolved == "fp16"
    else:
        upcast = upcast_attention == "on"
    on_gpu = device.type != "cpu"
    return MemoryPlan(
        attention=attention,
        checkpointing=checkpointing,
        vae_offload=vae_offload and on_gpu,
        precision=resolved,
        upcast_attention=upcast,
        half_weights=on_gpu and resolved != "fp32",
        text_encoders_lent=on_gpu and lend_text_encoders == "on",
    )


class PlannedModel(Protocol):
    """What the plan reads of a model. Every `Backend` (backends/contract.py) has these members; they are
    named here by shape because memory/ lies below backends/ and imports nothing from it."""

    device: torch.device

    @property
    def upcasts_attention(self) -> bool: ...

    @property
    def preferred_precision(self) -> str | None: ...

    @property
    def lends_text_encoders(self) -> bool: ...


def plan_for(config: TrainConfig, backend: PlannedModel) -> MemoryPlan:
    """The plan a `TrainConfig` asks for on `backend`'s device and model: worked out once per run (training/
    setup.py) and passed on, so the loop, the fit probe and the monitors compute in the same precision."""
    precision = config.precision
    if precision == "auto":
        # A host's model in half precision (the WebUI's fp16) is trained in that precision: converting its
        # weights would cost a copy of them, for no gain once attention scores are kept in fp32.
        precision = backend.preferred_precision or "auto"
    return choose_memory_plan(
        backend.device,
        precision=precision,
        attention=config.attention,
        checkpointing=config.gradient_checkpointing,
        vae_offload=config.vae_offload,
        upcast_attention=config.upcast_attention,
        model_upcasts_attention=backend.upcasts_attention,
        lend_text_encoders=lending_asked(config, backend),
    )


def lending_asked(config: TrainConfig, backend: PlannedModel) -> str:
    """The config's choice about lending the text encoders, as far as `backend` can follow it: "off" where
    it cannot lend ("auto" then simply never raises it); a clear refusal where "on" was asked of it.

    Only the standalone and A1111 SDXL backends lend. SD 1.x/2.x's text encoder is small (0.25 / 0.7 GB in fp16) beside what
    checkpointing frees, so a copy of it every step buys little; Forge places its models itself."""
    choice = config.lend_text_encoders
    if backend.lends_text_encoders:
        return choice
    if choice != "on":
        return "off"
    raise UserError(
        "'SDXL text encoders on the GPU only for their own work' is on, but the loaded model is not an SDXL "
        "model trained through this trainer's SDXL backends (SD 1.x/2.x's text encoder is small enough to stay "
        "on the GPU; Forge places its models itself). Set it to auto or off."
    )


# --- shared by the backends ---------------------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "sdpa", upcast: bool = False, mask=None
) -> torch.Tensor:
    """Multi-head attention over `[batch, heads, tokens, head_dim]`, scaled by 1/sqrt(head_dim).

    `upcast` computes in fp32 (outside autocast, which would cast SDPA's inputs back down), as A1111's own
    optimized attentions do with "Upcast cross attention layer to float32". The result has `q`'s dtype.
    """
    dtype = q.dtype
    if upcast and dtype != torch.float32:
        with torch.autocast(q.device.type, enabled=False):
            out = _attend(q.float(), k.float(), v.float(), kind, None if mask is None else mask.float())
        return out.to(dtype)
    return _attend(q, k, v, kind, mask)


def _attend(q, k, v, kind: str, mask) -> torch.Tensor:
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if kind == "xformers":
        import xformers.ops

        # xformers takes [batch, tokens, heads, head_dim]
        bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
        )
        return out.transpose(1, 2)
    if kind == "math":
        # The path A1111's trainer falls back to: the whole score matrix, kept for the backward pass.
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        return scores.softmax(dim=-1) @ v
    raise ValueError(f"unknown attention kind {kind!r}")


def device_of(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """Move `module` to `device` for a `with` block, then back to where it was."""
    home, device = device_of(module), torch.device(device)
    if home == device or (device.type == home.type and device.index is None):
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def text_encoder_lent(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`module` on `device` for one forward; the tensors its backward keeps wait in RAM until the backward
    needs them (memory/saved_in_ram.py). Afterwards the module's tensors are its RAM ones again, the very same
    storage: frozen weights need no copy back.

    What crosses PCIe per forward and backward, for an encoder of W bytes of weights of which W_b are those
    its backward multiplies by (each Linear's weight, each LayerNorm's weight and bias: all but the token and
    position tables and the Linear biases), and A bytes of saved activations: W host -> device for the
    forward, A device -> host while it runs, then at most W_b + A host -> device for the backward (a layer
    past the output used is never brought back). The saved weights are packed as references to their RAM
    originals (the module's own storage, kept here), not copied out as torch's `save_on_cpu` did: that was W_b
    more device -> host (a weight saved expanded, stride 0, at its expanded size), into pinned RAM each step.
    For SDXL's two encoders in fp16: W = 1.64 GB (817.7M parameters), W_b = 1.43 GB (CLIP-L's 85.0M and bigG's
    631.0M), so 3.07 GB + 2A per step where `save_on_cpu` made it 4.50 GB + 2A (arithmetic, not measured).

    On the CPU nothing moves and nothing is packed: the saved tensors are in RAM already."""
    kept = []  # (table, name, the tensor or Parameter object there, its data in RAM)
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is not None and tensor.device != device:
                    kept.append((table, name, tensor, tensor.data))
    try:
        lent = []  # (device copy, RAM original)
        for table, name, tensor, data in kept:
            copy = data.to(device, non_blocking=True)
            lent.append((copy, data))
            table[name] = _moved(tensor, copy)
        packing = saved_in_ram(lent, device) if device.type != "cpu" else contextlib.nullcontext()
        del lent  # the index in `saved_in_ram` holds them while the forward runs, and lets go after
        with packing:
            yield
    finally:
        for table, name, tensor, data in kept:
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = data
            table[name] = tensor


def _moved(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` in `tensor`'s place: a Parameter keeps being the same object where torch lets its data move
    (CPU <-> CUDA), and is stood in for by a new frozen one otherwise."""
    if not isinstance(tensor, torch.nn.Parameter):
        return value
    if torch._has_compatible_shallow_copy_type(tensor, value):
        tensor.data = value
        return tensor
    return torch.nn.Parameter(value, requires_grad=tensor.requires_grad)


@contextlib.contextmanager
def weights_in(dtype: torch.dtype, *modules: torch.nn.Module) -> Iterator[None]:
    """Store the floating-point weights of `modules` in `dtype` for a `with` block, then restore them exactly.

    The originals wait in RAM (the GPU holds only the low-precision copies) and come back bit for bit.
    """
    originals: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
    try:
        for module in modules:
            for owner in module.modules():
                for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
                    for name, tensor in table.items():
                        if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                            continue
                        low = tensor.detach().to(dtype)
                        originals.append((owner, name, is_parameter, tensor.detach().to("cpu")))
                        _replace(owner, name, is_parameter, low)
        yield
    finally:
        for owner, name, is_parameter, original in reversed(originals):
            device = (owner._parameters if is_parameter else owner._buffers)[name].device
            _replace(owner, name, is_parameter, original.to(device))


def _replace(owner: torch.nn.Module, name: str, is_parameter: bool, value: torch.Tensor) -> None:
    if is_parameter:
        owner._parameters[name].data = value  # the Parameter object (and what holds it) stays the same
    else:
        owner._buffers[name] = value
