"""Counting the bytes a training step holds, on a model that has no memory at all (the meta device).

Four pieces, used together by estimate.py around one forward and backward pass:

- `LiveBytes`, a TorchDispatchMode: every tensor an aten op returns is looked at once; a storage it has not
  seen is added to the live total, and taken off when the storage is freed, with the last tensor on it (weakref
  callbacks). The peak of that total is the peak the GPU allocator would report for the same program, since
  meta tensors are created and freed at exactly the points real ones are (Python refcounts, autograd's saved
  tensors, checkpoint recomputation in the backward pass). Storages created before the mode (the weights) are
  not seen: they are counted once by the caller. Each storage is also rounded up to 512 bytes, as PyTorch's
  CUDA caching allocator rounds every block (that rounded figure is what `torch.cuda.max_memory_allocated`
  sums).
- `CudaAutocast`, a TorchFunctionMode: CUDA autocast's casts, reproduced above autograd so that the cast
  copies are what autograd saves (as they are under real autocast). Meta tensors have no autocast dispatch
  key, so the real one cannot run here. The lists below are the subset of aten/src/ATen/autocast_mode.cpp
  (CUDA) that SD's UNets and CLIP text encoders call. Like real autocast, casts of leaf tensors that require
  a gradient (trainable weights) are cached for the autocast region; frozen weights are cast at each use.
- Checkpoint recomputation (`checkpoint_under_emulation`): torch's non-reentrant recomputation, done here
  for whoever calls `torch.utils.checkpoint.checkpoint` during the step (diffusers' blocks of any version,
  our backends' levers), under the emulated autocast state the forward pass had, as torch restores the real
  one; torch's own checkpoint cannot run on meta tensors before torch 2.5.
- `MemoryEfficientAttention`: SDPA / xformers accounted analytically. On meta, SDPA would take its math path
  and hold the tokens x tokens score matrix; the fused kernels never do. Forward: the output and a logsumexp
  (fp32, one per query row, padded to 32 rows) are saved with q, k and v. Backward: dq, dk, dv, plus an fp32
  dq accumulator and the per-row softmax delta (flash attention 2's workspace), freed when it returns.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

ALLOCATOR_BLOCK = 512  # bytes: every CUDA caching-allocator block is a multiple of this


def allocator_rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_BLOCK) * ALLOCATOR_BLOCK


class LiveBytes(TorchDispatchMode):
    """Tallies the bytes of storages created under it while they live; keeps the peak.

    `counting` can be switched off (the text encoder's work on the CPU when it is placed there): storages
    created then are never added. `peak_op` is the label of the op at which the peak was reached.

    A storage is freed when the last tensor on it is. Every tensor made under the mode is seen here: an op's
    result, and each view or alias of it (`detach` included: while a dispatch mode is on, torch makes even
    its internal shallow copies, such as the one autograd keeps of a saved output, through that op). torch
    keeps a tensor's Python object alive as long as C++ holds the tensor, so a weak reference to each of them
    says when it is gone, under every torch this package installs with. (A storage's own Python object
    could not say it: before torch 2.2 each `untyped_storage()` call makes a new one.)
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0  # bytes as asked for
        self.live_rounded = self.peak_rounded = 0  # bytes as the allocator rounds them
        self.counting = True
        self.peak_op = ""
        self._storages: dict[int, _Counted] = {}  # by the storage's address (`_cdata`)
        self._watchers: dict[int, tuple[weakref.ref, _Counted]] = {}  # by id of the weak reference

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        declared_returns = func._schema.returns
        results = (out,) if len(declared_returns) == 1 else out
        for declared, result in zip(declared_returns, results):
            # A view or an in-place result shares an input's storage: nothing new (and a view of a weight
            # must not count the weight again), but one more tensor that keeps a counted storage alive.
            aliased = declared.alias_info is not None
            if aliased and not self._storages:
                continue
            for tensor in tree_flatten(result)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._track(tensor, func, new=self.counting and not aliased)
        return out

    def _track(self, tensor: torch.Tensor, func, new: bool) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        counted = self._storages.get(key)
        if counted is None:
            if not new:
                return
            nbytes = storage.nbytes()
            if nbytes == 0:
                return
            counted = self._storages[key] = _Counted(key, nbytes, allocator_rounded(nbytes))
            self._add(counted, func)
        # Counted before the weak reference is made: a garbage collection that allocation may start must not
        # free the storage in between (were the other tensors on it in a reference cycle).
        counted.tensors += 1
        watcher = weakref.ref(tensor, self._tensor_freed)
        self._watchers[id(watcher)] = (watcher, counted)

    def _add(self, counted: _Counted, func) -> None:
        self.live += counted.nbytes
        self.live_rounded += counted.rounded
        if self.live_rounded > self.peak_rounded:
            self.peak_rounded, self.peak_op = self.live_rounded, str(func)
        self.peak = max(self.peak, self.live)

    def _tensor_freed(self, watcher: weakref.ref) -> None:
        _, counted = self._watchers.pop(id(watcher))
        counted.tensors -= 1
        if counted.tensors == 0:  # the storage goes with its last tensor
            del self._storages[counted.key]
            self.live -= counted.nbytes
            self.live_rounded -= counted.rounded


class _Counted:
    """A storage being counted: its address, its bytes (as asked for, as rounded), and how many tensors on it
    are alive."""

    __slots__ = ("key", "nbytes", "rounded", "tensors")

    def __init__(self, key: int, nbytes: int, rounded: int):
        self.key, self.nbytes, self.rounded, self.tensors = key, nbytes, rounded, 0


# --- CUDA autocast, reproduced --------------------------------------------------------------------------------

# Run in the autocast dtype (autocast_mode.cpp "lower_precision_fp").
_LOWER = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.baddbmm,
    torch.addmm,
    torch.addbmm,
    torch.einsum,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.mm,
    torch.Tensor.bmm,
    torch.Tensor.baddbmm,
    torch.Tensor.addmm,
    F.scaled_dot_product_attention,
}
# Run in fp32 (autocast "fp32" and "fp32_set_opt_dtype": their outputs are fp32 too).
_FP32 = {
    F.layer_norm,
    F.group_norm,
    torch.layer_norm,
    torch.group_norm,
    F.mse_loss,
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    torch.Tensor.softmax,
    torch.Tensor.log_softmax,
    torch.exp,
    torch.Tensor.exp,
    torch.pow,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.logsumexp,
    torch.Tensor.logsumexp,
}
# Weights stored in fp8 are cast to the compute dtype by the layers that use them (as Forge's and A1111's
# "fp8 weight" storage does); the copy lives as long as the op, or as long as autograd saves it.
_WEIGHT_USERS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d}
FP8 = getattr(torch, "float8_e4m3fn", None)


def _meta_fill_value_as_number(args, kwargs):
    """`torch.full(size, <0-d tensor>)` reads its fill value with `.item()`, which a meta tensor cannot give
    (transformers 4.30, A1111's pin, builds CLIP's causal mask this way). The value does not change the
    memory: any number of the same kind will do."""

    def as_number(value):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return 0.0 if value.is_floating_point() else 0
        return value

    if "fill_value" in kwargs:
        return args, {**kwargs, "fill_value": as_number(kwargs["fill_value"])}
    if len(args) >= 2:
        return (args[0], as_number(args[1]), *args[2:]), kwargs
    return args, kwargs


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's casts at `dtype`, above autograd. `enabled` follows `torch.autocast(..., enabled=)`
    blocks on the meta device (see `meta_autocast_blocks`); None as dtype is fp32 training (no casts)."""

    def __init__(self, dtype: torch.dtype | None):
        super().__init__()
        self.dtype = dtype
        self.enabled = [dtype is not None]
        self._cache: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.full:
            args, kwargs = _meta_fill_value_as_number(args, kwargs)
        if func in _WEIGHT_USERS:
            args, kwargs = self._cast_fp8(args, kwargs)
        if self.enabled[-1]:
            if func in _LOWER:
                args, kwargs = tree_map(self._to_lower, (args, kwargs))
            elif func in _FP32:
                args, kwargs = tree_map(self._to_fp32, (args, kwargs))
        if func is F.scaled_dot_product_attention:
            return memory_efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _cast_fp8(self, args, kwargs):
        if FP8 is None:
            return args, kwargs
        compute = self.dtype if self.enabled[-1] else None
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.dtype != FP8]
        compute = compute or (inputs[0].dtype if inputs else torch.float32)
        cast = lambda a: a.to(compute) if isinstance(a, torch.Tensor) and a.dtype == FP8 else a  # noqa: E731
        return tree_map(cast, (args, kwargs))

    def _to_lower(self, value):
        return self._cast(value, self.dtype)

    def _to_fp32(self, value):
        return self._cast(value, torch.float32)

    def _cast(self, value, dtype: torch.dtype):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        if value.dtype in (dtype, torch.float64):
            return value
        if value.is_leaf and value.requires_grad:  # autocast's cast cache: trainable weights, once a region
            cached = self._cache.get(id(value))
            if cached is None or cached.dtype != dtype:
                cached = self._cache[id(value)] = value.to(dtype)
            return cached
        return value.to(dtype)


_ACTIVE: list[CudaAutocast] = []
_REAL_AUTOCAST = torch.autocast
_REAL_CHECKPOINT = torch.utils.checkpoint.checkpoint


class _MetaAwareAutocast(_REAL_AUTOCAST):
    """`torch.autocast("meta", enabled=False)` (our fp32-scores attention turns autocast off that way) as a
    switch of the emulated autocast; every other device goes to the real one."""

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        self._meta = device_type == "meta"
        self._meta_enabled = enabled
        if not self._meta:
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    def __enter__(self):
        if not self._meta:
            return super().__enter__()
        if _ACTIVE:
            mode = _ACTIVE[-1]
            mode.enabled.append(bool(self._meta_enabled) and mode.dtype is not None)
        return self

    def __exit__(self, *exc):
        if not self._meta:
            return super().__exit__(*exc)
        if _ACTIVE:
            _ACTIVE[-1].enabled.pop()
        return False


@contextlib.contextmanager
def emulated_autocast(dtype: torch.dtype | None) -> Iterator[CudaAutocast]:
    """CUDA autocast at `dtype` for meta tensors, for a `with` block. Meanwhile `torch.autocast` is swapped
    for a subclass that hands "meta" blocks to the emulation (and everything else to the real class), and
    `torch.utils.checkpoint.checkpoint` for one that recomputes under the emulation (`checkpoint_under_emulation`)."""
    mode = CudaAutocast(dtype)
    with _activated(mode):
        yield mode


@contextlib.contextmanager
def _activated(mode: CudaAutocast, enabled: bool | None = None) -> Iterator[None]:
    _ACTIVE.append(mode)
    if enabled is not None:
        mode.enabled.append(enabled)
    torch.autocast = _MetaAwareAutocast
    torch.utils.checkpoint.checkpoint = checkpoint_under_emulation
    try:
        with mode:
            yield
    finally:
        if enabled is not None:
            mode.enabled.pop()
        _ACTIVE.remove(mode)
        if not _ACTIVE:
            torch.autocast = _REAL_AUTOCAST
            torch.utils.checkpoint.checkpoint = _REAL_CHECKPOINT
            # Real autocast drops its cast cache when its outermost region exits (checkpoint recomputation
            # enters a region of its own): the cast copies then live only as long as autograd saves them.
            mode._cache.clear()


def checkpoint_under_emulation(
    function,
    *args,
    use_reentrant=None,
    context_fn=None,
    determinism_check=None,
    debug=None,
    early_stop=None,
    **kwargs,
):
    """`torch.utils.checkpoint.checkpoint` while the emulation is on (diffusers up to 0.32 and transformers
    call it by that name; our backends' `_gradient_checkpointing_func` does too, for diffusers 0.33 on).

    The region is recomputed here, not by torch's checkpoint, for two reasons. Its recomputation (in the
    backward pass, after the autocast block) must run under the emulated autocast state of the forward pass,
    as torch's checkpoint restores the real autocast state it captured; and torch's checkpoint itself fails
    on meta tensors before torch 2.5 (it looks for a `torch.meta` device module), which the WebUIs ship.
    The recomputation is torch's non-reentrant one, which the backends use: every tensor the forward pass
    would save is dropped, the region's inputs are kept, and the first time the backward pass needs a saved
    tensor the region runs again until all of them are back; each is released once the backward pass has
    used it. A caller asking for the reentrant variant gets the same (the two hold the same tensors).
    """
    kwargs.pop("preserve_rng_state", None)  # meta tensors have no random state to preserve
    if not _ACTIVE:
        return _REAL_CHECKPOINT(function, *args, use_reentrant=use_reentrant, **kwargs)
    region = _RecomputedRegion(function, args, kwargs, _ACTIVE[-1])
    with torch.autograd.graph.saved_tensors_hooks(region.pack, region.unpack):
        return function(*args, **kwargs)


class _SavedLater:
    """What autograd holds in place of a tensor a checkpointed region saved (its shape and dtype, to check
    the recomputation against)."""

    __slots__ = ("shape", "dtype", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype = tensor.shape, tensor.dtype


class _StopRecomputing(Exception):
    pass


class _RecomputedRegion:
    def __init__(self, function, args, kwargs, mode: CudaAutocast):
        self.function, self.args, self.kwargs = function, args, kwargs  # kept for the recomputation
        self.mode, self.enabled = mode, mode.enabled[-1]  # the autocast state to recompute under
        self.placeholders: list[weakref.ref] = []
        self.recomputed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.done = False

    def pack(self, tensor: torch.Tensor) -> _SavedLater:
        placeholder = _SavedLater(tensor)
        self.placeholders.append(weakref.ref(placeholder))
        return placeholder

    def unpack(self, placeholder: _SavedLater) -> torch.Tensor:
        if not self.done:
            self.done = True
            self._recompute()
        return self.recomputed.pop(placeholder)

    def _recompute(self) -> None:
        count = 0

        def pack_again(tensor: torch.Tensor) -> None:
            nonlocal count
            index, count = count, count + 1
            placeholder = self.placeholders[index]() if index < len(self.placeholders) else None
            if placeholder is not None:  # (None: autograd no longer needs it)
                if (placeholder.shape, placeholder.dtype) != (tensor.shape, tensor.dtype):
                    raise RuntimeError(
                        f"VRAM estimate: checkpoint recomputation saved a {tensor.dtype} {tuple(tensor.shape)} "
                        f"tensor where the forward pass saved a {placeholder.dtype} {tuple(placeholder.shape)} "
                        "one: the emulated autocast differs between the two."
                    )
                self.recomputed[placeholder] = tensor.detach() if tensor.requires_grad else tensor
            if count == len(self.placeholders):
                raise _StopRecomputing  # everything is back: the rest of the region is not needed
            # The recomputation's own graph is never used: it must hold nothing (a saved output holding
            # itself would be a reference cycle through autograd, freed never).
            return None

        try:
            with (
                torch.enable_grad(),
                # Activated again even inside the autocast block: a backward pass started there runs with
                # the mode off (torch takes a mode off its stack while the mode handles a call, backward too).
                _activated(self.mode, self.enabled),
                torch.autograd.graph.saved_tensors_hooks(pack_again, _never_unpacked),
            ):
                self.function(*self.args, **self.kwargs)
        except _StopRecomputing:
            pass


def _never_unpacked(_):
    raise RuntimeError("VRAM estimate: the recomputation's own graph is not for a backward pass")


# --- memory-efficient attention, analytically -----------------------------------------------------------------

LSE_ROW_PADDING = 32  # the fused kernels pad the logsumexp's query rows to a multiple of 32


class MemoryEfficientAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        rows = -(-q.shape[-2] // LSE_ROW_PADDING) * LSE_ROW_PADDING
        logsumexp = q.new_empty((*q.shape[:-2], rows), dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp = ctx.saved_tensors
        workspace = (q.new_empty(q.shape, dtype=torch.float32), logsumexp.new_empty(logsumexp.shape))
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        del workspace
        return grads


def memory_efficient_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA's memory, as its fused kernels hold it (the mask, when given, is read, not stored)."""
    return MemoryEfficientAttention.apply(q, k, v)
