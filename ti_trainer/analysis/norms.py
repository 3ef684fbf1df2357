"""Overbake signals: how long the embedding's vectors are, against the model's ordinary words.

Every token the model knows is a vector of roughly the same length; a trained vector that grows far past that
range dominates every prompt it appears in, which is what "overbaked" looks like in the images (harsh lines,
the style swallowing the subject). OneTrainer preserves the norm for this reason (reference/peers.md §4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# When the backend cannot hand over its whole vocabulary, the range comes from plain words like these.
COMMON_WORDS = (
    "a photo of the painting by an artist with a cat dog house tree city street car person woman man "
    "portrait landscape mountain river sky cloud sun night light dark red blue green yellow old new small "
    "large beautiful detailed style drawing sketch oil watercolor color colour face hand water flower"
)
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


def ordinary_token_norms(backend) -> NormRange:
    """The 1st-99th percentile of the lengths of the model's token embeddings (its ordinary words)."""
    weight = getattr(backend, "token_embedding_weight", None)
    if weight is not None:
        norms, source = weight.detach().float().cpu().norm(dim=1), f"all {weight.shape[0]} tokens"
    else:
        vectors = backend.token_vectors(COMMON_WORDS)
        norms, source = vectors.float().norm(dim=1), f"{vectors.shape[0]} common words"
    quantiles = torch.quantile(norms.double(), torch.tensor([LOW_QUANTILE, 0.5, HIGH_QUANTILE]).double())
    low, median, high = (float(value) for value in quantiles)
    return NormRange(low, median, high, source)


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
