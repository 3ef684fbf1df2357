"""Images far from the rest of their set in colour or composition: the ones likely to dominate training.

The seed lost weekends to one image that "took over everything" (an orange glow, branches everywhere, a
crowd). For each measure we take the set's median and its typical spread (median absolute deviation, which
one odd image cannot inflate), and flag an image more than 3.5 spreads away. A floor on the spread keeps a
very uniform set from flagging differences nobody could see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ti_trainer.prepare.features import ImageFeatures

MIN_IMAGES = 5  # fewer than this and "the rest" is not a meaningful reference
_THRESHOLD = 3.5  # the usual cut-off for the median-based z-score (Iglewicz and Hoaglin)


@dataclass(frozen=True)
class _Measure:
    attribute: str
    kind: str  # "colour" | "composition"
    floor: float  # smallest spread used, in the measure's units
    above: str  # how to say "much higher than the rest"
    below: str


_MEASURES = (
    _Measure("brightness", "colour", 4.0, "much brighter", "much darker"),
    _Measure("red_green", "colour", 3.0, "much redder / more magenta", "much greener"),
    _Measure("yellow_blue", "colour", 3.0, "much more yellow / orange", "much bluer"),
    _Measure("saturation", "colour", 3.0, "much more saturated", "much more muted"),
    _Measure("contrast", "colour", 3.0, "much more contrasty", "much flatter"),
    _Measure(
        "detail", "composition", 0.03, "much busier (fine detail: branches, crowds, texture)", "much plainer"
    ),
)
_LAYOUT_FLOOR = 4.0


@dataclass
class Outlier:
    name: str
    kinds: list[str] = field(default_factory=list)  # "colour", "composition"
    reasons: list[str] = field(default_factory=list)
    score: float = 0.0  # the largest distance from the rest, in spreads


def find_outliers(features: dict[str, ImageFeatures]) -> list[Outlier]:
    """Images that stand out, furthest first. Empty for sets smaller than MIN_IMAGES."""
    if len(features) < MIN_IMAGES:
        return []
    names = list(features)
    found: dict[str, Outlier] = {}
    for measure in _MEASURES:
        values = np.array([getattr(features[name], measure.attribute) for name in names])
        median = float(np.median(values))
        spread = _spread(values, measure.floor)
        for name, value in zip(names, values):
            distance = (value - median) / spread
            if abs(distance) > _THRESHOLD:
                words = measure.above if distance > 0 else measure.below
                _note(
                    found,
                    name,
                    measure.kind,
                    f"{measure.kind}: {words} than the rest "
                    f"({measure.attribute.replace('_', '-')} {value:.2g}, typical {median:.2g})",
                    abs(distance),
                )
    layouts = np.array([features[name].layout for name in names])
    typical_layout = np.median(layouts, axis=0)
    layout_distances = np.sqrt(((layouts - typical_layout) ** 2).mean(axis=1))
    median = float(np.median(layout_distances))
    spread = _spread(layout_distances, _LAYOUT_FLOOR)
    for name, value in zip(names, layout_distances):
        distance = (value - median) / spread
        if distance > _THRESHOLD:
            _note(
                found,
                name,
                "composition",
                "composition: its light and dark masses sit where no other image has them",
                distance,
            )
    return sorted(found.values(), key=lambda outlier: -outlier.score)


def _spread(values: np.ndarray, floor: float) -> float:
    # 1.4826 scales the median absolute deviation to a standard deviation for normally spread values.
    return max(1.4826 * float(np.median(np.abs(values - np.median(values)))), floor)


def _note(found: dict[str, Outlier], name: str, kind: str, reason: str, score: float) -> None:
    outlier = found.setdefault(name, Outlier(name))
    if kind not in outlier.kinds:
        outlier.kinds.append(kind)
    outlier.reasons.append(reason)
    outlier.score = max(outlier.score, score)
