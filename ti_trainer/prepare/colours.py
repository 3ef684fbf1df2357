"""Colour measures of an image: its dominant colours, their names, and Lab statistics for comparing images.

Lab is used because distances in it follow what the eye sees: "more orange than the rest" is a difference
in its b* (blue-yellow) and a* (green-red) axes, brightness is L*.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Swatch:
    hex: str
    share: float  # fraction of the pixels
    name: str


def thumbnail_pixels(image: Image.Image, max_side: int = 64) -> np.ndarray:
    """An (N, 3) uint8 array of the pixels of a small copy: enough for colour statistics, quick to cluster."""
    small = image.convert("RGB")
    small.thumbnail((max_side, max_side), Image.BILINEAR)
    return np.asarray(small).reshape(-1, 3)


def rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """sRGB (0-255) -> CIE Lab (D65): L* 0-100, a* and b* about -128..127."""
    rgb = pixels.astype(np.float64) / 255.0
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [
            [0.4124564, 0.2126729, 0.0193339],
            [0.3575761, 0.7151522, 0.1191920],
            [0.1804375, 0.0721750, 0.9503041],
        ]
    )
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def dominant_colours(pixels: np.ndarray, count: int = 5, seed: int = 0) -> list[Swatch]:
    """The `count` main colours (k-means in Lab), largest share first; each swatch is its members' mean RGB."""
    if len(pixels) == 0:
        return []
    lab = rgb_to_lab(pixels)
    labels = _kmeans(lab, min(count, len(np.unique(pixels, axis=0))), seed)
    swatches = []
    for label in np.unique(labels):
        members = pixels[labels == label]
        rgb = tuple(int(round(v)) for v in members.mean(axis=0))
        swatches.append(Swatch(_hex(rgb), len(members) / len(pixels), colour_name(rgb)))
    return sorted(swatches, key=lambda swatch: -swatch.share)


def _kmeans(points: np.ndarray, count: int, seed: int, iterations: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # k-means++ start: spread the first centres out, so a small but distinct colour gets its own cluster.
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, count):
        distance = np.min(((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        if distance.sum() == 0:
            break
        centres.append(points[rng.choice(len(points), p=distance / distance.sum())])
    centres = np.array(centres)
    labels = np.zeros(len(points), dtype=int)
    for _ in range(iterations):
        labels = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        for index in range(len(centres)):
            members = points[labels == index]
            if len(members):
                centres[index] = members.mean(axis=0)
    return labels


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


_HUES = [
    (15, "red"),
    (40, "orange"),
    (65, "yellow"),
    (160, "green"),
    (195, "teal"),
    (255, "blue"),
    (290, "purple"),
    (335, "pink"),
    (360, "red"),
]


def colour_name(rgb: tuple[int, int, int]) -> str:
    """A rough everyday name ("dark orange", "pale blue", "grey") so a report reads without swatches."""
    hue, lightness, saturation = colorsys.rgb_to_hls(*(v / 255 for v in rgb))
    if lightness < 0.1:
        return "black"
    if lightness > 0.93:
        return "white"
    if saturation < 0.15 or (lightness < 0.2 and saturation < 0.3):
        return "grey" if 0.25 < lightness < 0.75 else ("dark grey" if lightness <= 0.25 else "light grey")
    degrees = hue * 360
    name = next(label for limit, label in _HUES if degrees < limit)
    if name == "orange" and lightness < 0.35:
        return "brown" if lightness >= 0.15 else "dark brown"
    if lightness < 0.3:
        return f"dark {name}"
    if lightness > 0.75 or saturation < 0.35:
        return f"pale {name}"
    return name
