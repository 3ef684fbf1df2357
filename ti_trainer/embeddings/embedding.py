"""The in-memory embedding and how A1111 initialises one from text (reference/a1111.md §1.1, §1.4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ti_trainer.embeddings.init_text import vector_sources
from ti_trainer.embeddings.vectors import Vectors, flat_values, vector_count, vectors_width


@dataclass
class Embedding:
    """An embedding's vectors and the metadata A1111 keeps beside them.

    `vectors` is a float32 tensor `[num_vectors, width]` (width 1024 for SD 2.x, 768 for SD 1.x), or for SDXL
    one such tensor per text encoder, `{"clip_l": [n, 768], "clip_g": [n, 1280]}` (embeddings/vectors.py).
    `step` is the number of optimizer steps it has been trained for.
    """

    name: str
    vectors: Vectors
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def num_vectors(self) -> int:
        return vector_count(self.vectors)

    @property
    def width(self) -> int:
        """A1111's `shape`: the vectors' width, or for one set per encoder the sum of their widths."""
        return vectors_width(self.vectors)

    @property
    def per_encoder(self) -> bool:
        return not isinstance(self.vectors, torch.Tensor)

    def checksum(self) -> str:
        return vectors_checksum(self.vectors)


def vectors_from_init(init_token_vectors: torch.Tensor, num_vectors: int, width: int) -> torch.Tensor:
    """A1111's initial vectors: row i copies init token floor(i*T/num_vectors).

    Fewer tokens than vectors repeats each token in blocks (T=2, n=4 -> 0,0,1,1); more tokens than vectors
    strides through them (T=4, n=2 -> 0,2). No init tokens gives zeros.
    """
    if num_vectors < 1:
        raise ValueError("num_vectors must be at least 1")
    vectors = torch.zeros(num_vectors, width, dtype=torch.float32)
    tokens = init_token_vectors.shape[0] if init_token_vectors is not None else 0
    for i, token in enumerate(vector_sources(tokens, num_vectors)):
        vectors[i] = init_token_vectors[token].detach().float().cpu()
    return vectors


def vectors_from_init_per_encoder(
    init_token_vectors: Vectors | None, num_vectors: int, zeros: Vectors
) -> Vectors:
    """`vectors_from_init` for each encoder's own token vectors (the same tokens in each), in the form of
    `zeros` (the family's zero vectors: a tensor, or one per encoder)."""
    if init_token_vectors is None:
        return zeros
    if isinstance(zeros, torch.Tensor):
        return vectors_from_init(init_token_vectors, num_vectors, int(zeros.shape[-1]))
    return {
        key: vectors_from_init(init_token_vectors[key], num_vectors, int(zero.shape[-1]))
        for key, zero in zeros.items()
    }


def vectors_checksum(vectors: Vectors) -> str:
    """A1111's 4-hex-digit checksum of the values, used to pair a `.optim` file with its embedding. A1111's
    own fails on SDXL's dict (reference/sdxl.md §3); ours runs over every encoder's values in key order."""
    r = 0
    for value in (flat_values(vectors).cpu() * 100).tolist():
        r = ((r * 281) ^ (int(value) * 997)) & 0xFFFFFFFF
    return f"{r & 0xFFFF:04x}"
