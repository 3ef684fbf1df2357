"""An embedding's vectors in either form: one tensor, or one tensor per text encoder.

SD 1.x and 2.x have one text encoder, and an embedding is A1111's single tensor `[n, width]`. SDXL has two
(CLIP ViT-L and OpenCLIP ViT-bigG), and an embedding holds one tensor per encoder, keyed as every SDXL tool
keys them: `{"clip_l": [n, 768], "clip_g": [n, 1280]}`, the same n in both (reference/sdxl.md §3). The
training core treats both forms alike through these few functions: the optimizer trains every tensor, the
NaN guard and the clipping look at all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Vectors = torch.Tensor | dict[str, torch.Tensor]


def vector_tensors(vectors: Vectors) -> list[torch.Tensor]:
    """Every tensor of `vectors`, in a fixed order (a dict's by key), so an optimizer's state lines up with
    them however the dict was built or read."""
    if isinstance(vectors, torch.Tensor):
        return [vectors]
    return [vectors[key] for key in sorted(vectors)]


def map_vectors(vectors: Vectors, function: Callable[[torch.Tensor], torch.Tensor]) -> Vectors:
    """`function` applied to every tensor, the form kept."""
    if isinstance(vectors, torch.Tensor):
        return function(vectors)
    return {key: function(tensor) for key, tensor in vectors.items()}


def detached_copy(vectors: Vectors) -> Vectors:
    """A float32 CPU copy, cut from any graph: what an `Embedding` keeps and a file receives."""
    return map_vectors(vectors, lambda tensor: tensor.detach().float().cpu().clone().contiguous())


def vector_count(vectors: Vectors) -> int:
    """How many vectors (rows) it holds; for one set per encoder, the rows of each (A1111 counts `clip_g`'s)."""
    if isinstance(vectors, torch.Tensor):
        return int(vectors.shape[0])
    return (
        int(vectors["clip_g"].shape[0]) if "clip_g" in vectors else int(next(iter(vectors.values())).shape[0])
    )


def vectors_width(vectors: Vectors) -> int:
    """The width A1111 gives the embedding: the tensor's, or the sum of every encoder's (SDXL: 2048)."""
    return sum(int(tensor.shape[-1]) for tensor in vector_tensors(vectors))


def flat_values(vectors: Vectors) -> torch.Tensor:
    """Every value in one flat float32 tensor (the tensors' fixed order): for checksums and gradient lengths."""
    return torch.cat([tensor.detach().float().reshape(-1) for tensor in vector_tensors(vectors)])
