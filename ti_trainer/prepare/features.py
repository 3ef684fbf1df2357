"""Per-image measures that make images comparable across a dataset: colour, tone, detail and layout.

All are taken from a small copy (at most 128 px a side), so big and small images compare fairly and a
hundred-image report takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ti_trainer.prepare.colours import rgb_to_lab

_SIDE = 128
_LAYOUT_GRID = 4
# A step of this many L* units between neighbouring pixels counts as an edge (visible detail).
_EDGE_STEP = 6.0


@dataclass
class ImageFeatures:
    brightness: float  # mean L*, 0-100
    red_green: float  # mean a*: positive is redder/magenta, negative greener
    yellow_blue: float  # mean b*: positive is yellower/orange, negative bluer
    saturation: float  # mean chroma
    contrast: float  # standard deviation of L*
    detail: float  # fraction of pixels on an edge: branches, crowds, texture score high
    layout: list[float]  # 4x4 grid of L* minus its mean: where the light and dark masses sit


def image_features(image: Image.Image) -> ImageFeatures:
    small = image.convert("RGB")
    small.thumbnail((_SIDE, _SIDE), Image.BILINEAR)
    pixels = np.asarray(small)
    height, width = pixels.shape[:2]
    lab = rgb_to_lab(pixels.reshape(-1, 3))
    lightness = lab[:, 0].reshape(height, width)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    steps_x = np.abs(np.diff(lightness, axis=1))[:-1, :] if height > 1 else np.zeros((0, 0))
    steps_y = np.abs(np.diff(lightness, axis=0))[:, :-1] if width > 1 else np.zeros((0, 0))
    edges = np.maximum(steps_x, steps_y) if steps_x.size and steps_y.size else np.zeros(1)
    grid = np.asarray(
        Image.fromarray(lightness.astype(np.float32), mode="F").resize(
            (_LAYOUT_GRID, _LAYOUT_GRID), Image.BOX
        )
    )
    return ImageFeatures(
        brightness=float(lab[:, 0].mean()),
        red_green=float(lab[:, 1].mean()),
        yellow_blue=float(lab[:, 2].mean()),
        saturation=float(chroma.mean()),
        contrast=float(lab[:, 0].std()),
        detail=float((edges > _EDGE_STEP).mean()),
        layout=[float(v) for v in (grid - grid.mean()).ravel()],
    )
