"""Where a lent text encoder's backward finds what it saved (memory/plan.py `text_encoder_lent`).

While an encoder is lent, the tensors autograd saves for its backward wait in RAM instead of on the GPU. Two
kinds reach the pack hook:

- the lent weights themselves, or views of them (torch 2.x, by experiment): Linear saves its weight
  transposed (`weight.t()`, not its bias), LayerNorm its weight and bias, a matmul its matrix, and a Linear
  over a non-contiguous 3-D input (nn.MultiheadAttention's in-projection on a permuted input) the transposed
  weight expanded over the leading dimension, stride 0; an Embedding saves nothing of its frozen table.
  These already have a RAM copy, the module's own storage the lending keeps: they are packed as a
  reference to it plus how to view it (`RamView`), so nothing is copied out, and the backward gets each
  back with one host -> device copy of the weight, laid out as autograd saved it;
- everything else (activations, and weights cast by autocast: a new tensor): copied to RAM, pinned when the
  device is a GPU, as torch's `save_on_cpu` does.

The index of the lent weights holds their device copies only while the forward runs (`saved_in_ram` clears
it on exit): autograd keeps the pack hook alive with the graph, so anything it referenced would stay on the
GPU until the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

# storage key -> (the device copy of a lent weight, its RAM original)
LentIndex = dict[int, tuple[torch.Tensor, torch.Tensor]]
# A tensor's place in its storage: size, stride, offset (in elements)
Layout = tuple[torch.Size, tuple[int, ...], int]


@dataclass(frozen=True)
class RamView:
    """A saved tensor that views a lent weight, packed as the weight's RAM original and the view's layout."""

    original: torch.Tensor  # the module's own RAM tensor (not a copy)
    storage_elements: int  # the device copy's storage, in elements
    copy_layout: Layout  # the device copy in that storage
    view_layout: Layout  # the saved tensor in that storage


def storage_key(tensor: torch.Tensor) -> int:
    """One number per storage, shared by every view of it. The storage object's address, not `data_ptr()`:
    tensors without data (the meta device, empty ones) all have data pointer 0."""
    return tensor.untyped_storage()._cdata


def lent_index(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> LentIndex:
    """The index `lent_weight_view` reads, from (device copy, RAM original) pairs."""
    return {storage_key(copy): (copy, original) for copy, original in pairs}


def lent_weight_view(saved: torch.Tensor, index: LentIndex) -> RamView | None:
    """`saved` as a view of a lent weight's RAM original, or None when it is not one (an activation, a cast
    copy, or a view of the weight's bytes in another dtype: then it is copied to RAM like any other)."""
    if saved.layout != torch.strided:
        return None
    entry = index.get(storage_key(saved))
    if entry is None:
        return None
    copy, original = entry
    if not (saved.device == copy.device and saved.dtype == copy.dtype == original.dtype):
        return None
    return RamView(
        original=original,
        storage_elements=copy.untyped_storage().nbytes() // copy.element_size(),
        copy_layout=(copy.size(), copy.stride(), copy.storage_offset()),
        view_layout=(saved.size(), saved.stride(), saved.storage_offset()),
    )


def from_ram_view(view: RamView, device: torch.device) -> torch.Tensor:
    """The saved tensor again: one host -> device copy of the weight, laid out as its device copy was (a
    transposed or expanded view comes back with the same strides, as autograd saved it)."""
    storage = torch.empty(view.storage_elements, dtype=view.original.dtype, device=device)
    storage.as_strided(*view.copy_layout).copy_(view.original, non_blocking=True)
    return storage.as_strided(*view.view_layout)


def to_ram(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A device -> host copy of a saved tensor that is not a lent weight, as torch's `save_on_cpu` makes it."""
    if not pin_memory:
        return tensor.cpu()
    packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    packed.copy_(tensor)
    return packed


@contextlib.contextmanager
def saved_in_ram(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> Iterator[None]:
    """For a `with` block on `device` (a GPU), every tensor autograd saves waits in RAM until the backward:
    views of the lent weights (`pairs`: device copy, RAM original) as references to their RAM originals,
    everything else copied out. Same `with` shape as `torch.autograd.graph.save_on_cpu`."""
    index = lent_index(pairs)
    pin_memory = device.type == "cuda"

    def pack(tensor: torch.Tensor) -> RamView | tuple[torch.device, torch.Tensor]:
        view = lent_weight_view(tensor, index)
        if view is not None:
            return view
        return tensor.device, to_ram(tensor, pin_memory)

    def unpack(packed: RamView | tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        if isinstance(packed, RamView):
            return from_ram_view(packed, device)
        home, tensor = packed
        return tensor.to(home, non_blocking=pin_memory)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        index.clear()  # the hooks live as long as the graph: they must not keep the device copies alive
