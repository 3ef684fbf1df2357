"""Overbake signals: how long the embedding's vectors are, against the model's ordinary words.

Every token the model knows is a vector of roughly the same length; a trained vector that grows far past that
range dominates every prompt it appears in, which is what "overbaked" looks like in the images (harsh lines,
the style swallowing the subject). OneTrainer preserves the norm for this reason (reference/peers.md §4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

LOW_QUANTILE, HIGH_QUANTILE = 0.01, 0.99


@dataclass(frozen=True)
class NormRange:
    low: float
    median: float
    high: float
    source: str  # what the range was measured on

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> NormRange | None:
        try:
            return cls(float(data["low"]), float(data["median"]), float(data["high"]), str(data["source"]))
        except (TypeError, KeyError, ValueError):
            return None


def ordinary_token_norms(backend: Backend) -> NormRange:
    """The range of the model's ordinary words: read from its text encoder's token-embedding matrix, the
    same way on every host (the WebUI's ldm model and the standalone diffusers one)."""
    encoder = backend.family.text_encoders[0].key
    return token_norm_range(backend.token_embedding_weight(encoder))


def token_norm_range(token_embedding_weight: torch.Tensor) -> NormRange:
    """The 1st-99th percentile of the lengths of every token's embedding `[vocab, width]`, computed in fp32
    on the CPU whatever the matrix's dtype and device."""
    norms = token_embedding_weight.detach().to("cpu", torch.float32).norm(dim=1)
    quantiles = torch.quantile(norms.double(), torch.tensor([LOW_QUANTILE, 0.5, HIGH_QUANTILE]).double())
    low, median, high = (float(value) for value in quantiles)
    return NormRange(low, median, high, f"all {token_embedding_weight.shape[0]} tokens")


def vector_norms(vectors: torch.Tensor) -> list[float]:
    return [float(value) for value in vectors.detach().float().cpu().norm(dim=-1).reshape(-1)]


def outside_range(norms: list[float], reference: NormRange) -> list[int]:
    """Indices of the vectors whose length is outside the ordinary range."""
    return [index for index, norm in enumerate(norms) if not reference.low <= norm <= reference.high]


def first_departures(steps: list[int], rows: list[list[float]], reference: NormRange) -> dict[int, int]:
    """Vector index -> the first recorded step at which it was outside the range."""
    found: dict[int, int] = {}
    for step, norms in zip(steps, rows):
        for index in outside_range(norms, reference):
            found.setdefault(index, step)
    return found


def describe(norms: list[float], reference: NormRange) -> str:
    lengths = ", ".join(f"{norm:.2f}" for norm in norms)
    return (
        f"vector lengths {lengths}; the model's ordinary words are {reference.low:.2f}-{reference.high:.2f} "
        f"(median {reference.median:.2f})"
    )
