"""Perceptual hashes: images that look alike (resized, re-encoded, slightly retouched) get nearby hashes.

pHash: the signs of the lowest 8x8 frequencies of a 32x32 grey copy, relative to their median. Two copies
of the same picture differ in a few of the 64 bits; different pictures in about half of them.

Finding the near-duplicates among thousands of images compares hashes by multi-index hashing (Norouzi et al.,
"Fast search in Hamming space with multi-index hashing", CVPR 2012): the 64 bits are cut into 4 bands of
16; two hashes within `max_bits` of each other differ in at most `max_bits // 4` bits in at least one band
(pigeonhole), so only hashes whose band lies that close are compared in full. The candidates are looked up
with numpy on sorted band values, so 10,000 images take a fraction of a second instead of the 50 million
pairwise comparisons of the plain double loop, with exactly the same pairs found.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from itertools import combinations

import numpy as np
from PIL import Image

# At most this many differing bits counts as "the same picture": re-encoding or resizing stays under ~4,
# unrelated photos sit near 32.
HASH_BITS = 64  # an 8x8 DCT sign pattern
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


# (steps done, steps in all, what is being done): the duplicate search's progress, for a bar or a log.
SearchProgress = Callable[[int, int, str], None]

_BANDS = 4
_BAND_BITS = HASH_BITS // _BANDS
_BAND_MASK = (1 << _BAND_BITS) - 1
# Beyond this many differing bits per band the probes outnumber a plain comparison of every pair.
_MAX_PROBE_BITS = 3
_PROBES_PER_BLOCK = 1 << 20  # band lookups per numpy step: bounds memory whatever the size of the set
_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


def near_duplicate_groups(
    hashes: dict[str, int], max_bits: int = NEAR_DUPLICATE_BITS, progress: SearchProgress | None = None
) -> list[list[str]]:
    """Names whose hashes are within `max_bits` of another in the group, groups of two or more, in name order."""
    names = sorted(hashes)
    # Identical hashes (exact copies, the same file twice) group without any search.
    unique, which = np.unique(
        np.array([hashes[name] for name in names], dtype=np.uint64), return_inverse=True
    )
    pairs = near_pairs(unique, max_bits, progress)
    parent = list(range(len(unique)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for first, second in pairs:
        parent[root(second)] = root(first)
    groups: dict[int, list[str]] = {}
    for name, index in zip(names, which.ravel().tolist()):
        groups.setdefault(root(index), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def near_pairs(
    values: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS, progress: SearchProgress | None = None
) -> list[tuple[int, int]]:
    """Index pairs (i < j) of the uint64 `values` that differ in at most `max_bits` bits, sorted."""
    values = np.asarray(values, dtype=np.uint64)
    if len(values) < 2 or max_bits < 0:
        return []
    probe_bits = max_bits // _BANDS
    if probe_bits > _MAX_PROBE_BITS:
        codes = _all_pairs_within(values, max_bits, progress)
    else:
        codes = _multi_index_pairs(values, max_bits, probe_bits, progress)
    count = len(values)
    return [(code // count, code % count) for code in np.unique(codes).tolist()]


def _multi_index_pairs(
    values: np.ndarray, max_bits: int, probe_bits: int, progress: SearchProgress | None
) -> np.ndarray:
    """Pair codes i * n + j of the pairs within `max_bits`, found through their bands."""
    masks = np.array(
        [
            sum(1 << bit for bit in bits)
            for flips in range(probe_bits + 1)
            for bits in combinations(range(_BAND_BITS), flips)
        ],
        dtype=np.int64,
    )
    rows_per_block = max(1, _PROBES_PER_BLOCK // len(masks))
    blocks = range(0, len(values), rows_per_block)
    steps, done = _BANDS * len(blocks), 0
    found: list[np.ndarray] = []
    for band_index in range(_BANDS):
        band = ((values >> np.uint64(band_index * _BAND_BITS)) & np.uint64(_BAND_MASK)).astype(np.int64)
        # Items sorted by band value, and where each of the 65536 values starts in that order: a probe
        # finds its matches by two table lookups.
        order = np.argsort(band, kind="stable")
        counts = np.bincount(band, minlength=_BAND_MASK + 1)
        starts = np.cumsum(counts) - counts
        for start in blocks:
            rows = np.arange(start, min(start + rows_per_block, len(values)))
            # Every band value within `probe_bits` of each row's: the row's band XOR each mask.
            probes = (band[rows][:, None] ^ masks[None, :]).ravel()
            probe_rows = np.repeat(rows, len(masks))
            found.append(_band_matches(values, probes, probe_rows, order, starts, counts, max_bits))
            done += 1
            if progress is not None:
                progress(done, steps, "comparing image hashes")
    return np.concatenate(found)


def _band_matches(
    values: np.ndarray,
    probes: np.ndarray,
    rows: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    band_counts: np.ndarray,
    max_bits: int,
) -> np.ndarray:
    """Codes of the pairs (row, other) whose band equals the row's probe and whose full hashes are close."""
    low = starts[probes]
    counts = band_counts[probes]
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    firsts = np.repeat(rows, counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    seconds = order[np.repeat(low, counts) + offsets]
    keep = firsts < seconds  # each pair once, never an item with itself
    firsts, seconds = firsts[keep], seconds[keep]
    close = _popcount(values[firsts] ^ values[seconds]) <= max_bits
    return firsts[close] * len(values) + seconds[close]


def _all_pairs_within(values: np.ndarray, max_bits: int, progress: SearchProgress | None) -> np.ndarray:
    """Pair codes by comparing every pair, a block of rows at a time (for large `max_bits` only)."""
    count = len(values)
    rows_per_block = max(1, (1 << 22) // count)
    found: list[np.ndarray] = []
    for start in range(0, count, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, count))
        distances = _popcount(values[rows, None] ^ values[None, :])
        firsts, seconds = np.nonzero((distances <= max_bits) & (rows[:, None] < np.arange(count)[None, :]))
        found.append(rows[firsts] * count + seconds)
        if progress is not None:
            progress(int(rows[-1]) + 1, count, "comparing image hashes")
    return np.concatenate(found)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy 1.26, which the WebUI pins, has no bitwise_count)."""
    as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8)
    return _POPCOUNT[as_bytes].reshape(*values.shape, 8).sum(axis=-1, dtype=np.int64)
