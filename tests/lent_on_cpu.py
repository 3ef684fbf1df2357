"""A GPU lending stood in for on the CPU (memory/saved_in_ram.py's packing, with real data): each weight and
buffer of a module replaced by a copy in other CPU storage, as `text_encoder_lent` puts its device copies in
place, and poisoned when the forward ends, so that a backward that reads them instead of the RAM originals
gives NaN."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ti_trainer.memory.saved_in_ram import saved_in_ram


@contextlib.contextmanager
def copies_in_place(module: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each weight and buffer of `module` replaced by a copy in other CPU storage; yields (copy, original)
    pairs and puts the originals back."""
    pairs, kept = [], []
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                copy = tensor.detach().clone()
                pairs.append((copy, tensor.data))
                kept.append((table, name, tensor, tensor.data))
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = copy
                else:
                    table[name] = copy
    try:
        yield pairs
    finally:
        for table, name, tensor, data in kept:
            if isinstance(tensor, torch.nn.Parameter):
                tensor.data = data
            else:
                table[name] = data


@contextlib.contextmanager
def lent_in_other_storage(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`text_encoder_lent(module, device)` on the CPU as on a GPU: the copies in place, what the backward
    keeps packed by `saved_in_ram`, and the copies poisoned (NaN) when the forward ends."""
    with copies_in_place(module) as pairs:
        try:
            with saved_in_ram(pairs, device):
                yield
        finally:
            for copy, _ in pairs:
                if copy.is_floating_point():
                    copy.fill_(float("nan"))
