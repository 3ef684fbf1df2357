"""Perceptual hashes: images that look alike (resized, re-encoded, slightly retouched) get nearby hashes.

pHash: the signs of the lowest 8x8 frequencies of a 32x32 grey copy, relative to their median. Two copies
of the same picture differ in a few of the 64 bits; different pictures in about half of them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

# At most this many differing bits counts as "the same picture": re-encoding or resizing stays under ~4,
# unrelated photos sit near 32.
NEAR_DUPLICATE_BITS = 10


@lru_cache(maxsize=1)
def _dct_matrix(size: int = 32) -> np.ndarray:
    rows = np.arange(size)[:, None]
    cols = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * cols + 1) * rows / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


def perceptual_hash(image: Image.Image) -> int:
    gray = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    dct = _dct_matrix()
    low = (dct @ gray @ dct.T)[:8, :8].ravel()
    bits = low[1:] > np.median(low[1:])  # the DC term only says how bright the image is
    return int("".join("1" if bit else "0" for bit in (False, *bits)), 2)


def hash_distance(first: int, second: int) -> int:
    return (first ^ second).bit_count()


def near_duplicate_groups(hashes: dict[str, int], max_bits: int = NEAR_DUPLICATE_BITS) -> list[list[str]]:
    """Names whose hashes are within `max_bits` of another in the group, groups of two or more, in name order."""
    names = sorted(hashes)
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if hash_distance(hashes[first], hashes[second]) <= max_bits:
                parent[root(second)] = root(first)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(root(name), []).append(name)
    return [group for group in groups.values() if len(group) > 1]
