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


def ordinary_token_norms(backend: Backend, encoder: str | None = None) -> NormRange:
    """The range of the model's ordinary words: read from the token-embedding matrix of its text encoder
    `encoder` (default: its first), the same way on every host (the WebUI's ldm model and the standalone
    diffusers one). SDXL's two encoders each have their own range."""
    encoder = encoder or backend.family.text_encoders[0].key
    return token_norm_range(backend.token_embedding_weight(encoder))


def norm_column(index: int, encoder: str | None = None) -> str:
    """The norms CSV's column of vector `index`: `vector_0`, or with one set per encoder `clip_g_vector_0`."""
    return f"vector_{index}" if encoder is None else f"{encoder}_vector_{index}"


def token_norm_range(token_embedding_weight: torch.Tensor) -> NormRange:
    """The 1st-99th percentile of the lengths of every token's embedding `[vocab, width]`, computed in fp32
    on the CPU whatever the matrix's dtype and device."""
    norms = token_embedding_weight.detach().to("cpu", torch.float32).norm(dim=1)
    quantiles = torch.quantile(norms.double(), torch.tensor([LOW_QUANTILE, 0.5, HIGH_QUANTILE]).double())
    low, median, high = (float(value) for value in quantiles)
    return NormRange(low, median, high, f"all {token_embedding_weight.shape[0]} tokens")


def vector_norms(vectors: torch.Tensor) -> list[float]:
    return [float(value) for value in vectors.detach().float().cpu().norm(dim=-1).reshape(-1)]


# The overbake rule. A vector is flagged only on the high side (a short vector is weak, not overbaked; a zero
# initialised one starts below the range and must not count as "grown outside"), only when it is clearly
# longer than ordinary words: past MARGIN x the top of their range (the 99th percentile, so 1.5x is far out
# of the distribution, while a fresh step-1 vector that just touches the top is not), and clearly past its
# own starting length (GROWTH x), so a vector initialised from an unusually long token is not flagged for
# where it started. One long reading is noise (an Adam step at a high learning rate); it must hold for
# CONSECUTIVE_CHECKS recorded checks in a row.
MARGIN = 1.5
GROWTH = 1.5
CONSECUTIVE_CHECKS = 3


def limit(reference: NormRange) -> float:
    """The length past which a vector counts as overgrown: MARGIN x the top of the ordinary words."""
    return MARGIN * reference.high


def overgrown(norm: float, start: float, reference: NormRange) -> bool:
    """Longer than the ordinary words by the margin, and clearly longer than where the vector started."""
    return norm > limit(reference) and norm > GROWTH * start


class OverbakeTracker:
    """Feeds on the recorded checks of one run, in step order; flags a vector once it has been overgrown for
    CONSECUTIVE_CHECKS checks in a row, and remembers the step its streak began (its own first step)."""

    def __init__(self, reference: NormRange, checks: int = CONSECUTIVE_CHECKS):
        self.reference = reference
        self.checks = checks
        self.starting: list[float] | None = None  # each vector's length at the first check (the run's start)
        self.flagged: dict[int, int] = {}  # vector -> first step of the streak that flagged it
        self._streaks: dict[int, tuple[int, int]] = {}  # vector -> (first step, checks so far)

    def check(self, step: int, norms: list[float]) -> list[int]:
        """The vectors flagged at this check (each only once)."""
        if self.starting is None:
            self.starting = list(norms)
        newly = []
        for index, norm in enumerate(norms):
            start = self.starting[index] if index < len(self.starting) else 0.0
            if not overgrown(norm, start, self.reference):
                self._streaks.pop(index, None)
                continue
            first, count = self._streaks.get(index, (step, 0))
            self._streaks[index] = (first, count + 1)
            if count + 1 >= self.checks and index not in self.flagged:
                self.flagged[index] = first
                newly.append(index)
        return newly


def first_departures(steps: list[int], rows: list[list[float]], reference: NormRange) -> dict[int, int]:
    """Vector index -> the step its overgrowth began, for the vectors the overbake rule flags (see MARGIN)."""
    tracker = OverbakeTracker(reference)
    for step, norms in zip(steps, rows):
        tracker.check(step, norms)
    return tracker.flagged


def describe_overgrowth(flagged: dict[int, int], reference: NormRange) -> str:
    """ "vector 0 from step 30, vector 1 from step 40: longer than ..." for the flagged vectors."""
    which = ", ".join(f"vector {index} from step {step}" for index, step in sorted(flagged.items()))
    return (
        f"{which}: longer than {MARGIN:g}x the model's longest ordinary words ({limit(reference):.2f}; they are "
        f"{reference.low:.2f}-{reference.high:.2f}) and {GROWTH:g}x their own starting length, for "
        f"{CONSECUTIVE_CHECKS} checks in a row"
    )


def describe(norms: list[float], reference: NormRange) -> str:
    lengths = ", ".join(f"{norm:.2f}" for norm in norms)
    return (
        f"vector lengths {lengths}; the model's ordinary words are {reference.low:.2f}-{reference.high:.2f} "
        f"(median {reference.median:.2f})"
    )
