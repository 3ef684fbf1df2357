"""Sizes and crops: fit an image to the output size, split long images into tiles, mirror copies.

Sizes are in pixels; a focus point is a fraction of the width and height (0.5, 0.5 is the centre).
"""

from __future__ import annotations

import math

from PIL import Image, ImageOps

from ti_trainer.training.buckets import aspect_buckets, nearest_bucket

FLIPS = ("horizontal", "vertical", "both")

# Resizing first with a cheap box reduction, then Lanczos, is much faster on camera-sized images and
# indistinguishable at training sizes.
_REDUCING_GAP = 3.0


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.LANCZOS, reducing_gap=_REDUCING_GAP)


def cover_scale(image_size: tuple[int, int], target: tuple[int, int]) -> float:
    """How much `image_size` must be scaled to cover `target` (above 1: it is enlarged, so it softens)."""
    return max(target[0] / image_size[0], target[1] / image_size[1])


def cover_and_crop(
    image: Image.Image, target: tuple[int, int], focus: tuple[float, float] = (0.5, 0.5)
) -> Image.Image:
    """Scale so `image` covers `target` without stretching, then cut `target` out, centred on `focus`."""
    return image.resize(
        target, Image.LANCZOS, box=crop_box(image.size, target, focus), reducing_gap=_REDUCING_GAP
    )


def crop_box(
    image_size: tuple[int, int], target: tuple[int, int], focus: tuple[float, float] = (0.5, 0.5)
) -> tuple[float, float, float, float]:
    """The part of the source (left, top, right, bottom, in source pixels) that becomes `target`.

    The crop is placed on the pixel grid of the scaled image, then converted back to source coordinates.
    Rounding the scaled size can make that grid a fraction of a pixel longer than the source, so the box
    is clamped inside the source afterwards: Pillow refuses a box that passes the edge by any amount.
    """
    width, height = target
    scale = cover_scale(image_size, target)
    scaled_size = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
    left = _clamp(round(focus[0] * scaled_size[0] - width / 2), 0, scaled_size[0] - width)
    top = _clamp(round(focus[1] * scaled_size[1] - height / 2), 0, scaled_size[1] - height)
    # Crop in source coordinates first, so only the kept part is resampled.
    box_width, box_height = min(width / scale, image_size[0]), min(height / scale, image_size[1])
    left_source = _clamp(left / scale, 0.0, image_size[0] - box_width)
    top_source = _clamp(top / scale, 0.0, image_size[1] - box_height)
    # min() again: (edge - width) + width can land one float step past the edge.
    right = min(left_source + box_width, float(image_size[0]))
    bottom = min(top_source + box_height, float(image_size[1]))
    return (left_source, top_source, right, bottom)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(value, high))


def bucket_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The training bucket (sides in steps of 64, area at most size²) closest to the image's aspect ratio.

    Preparing straight to the bucket means bucketed training uses the prepared image as it is, uncropped.
    """
    return nearest_bucket(image_size, aspect_buckets(size, size))


def needs_split(image_size: tuple[int, int], size: int, threshold: float) -> bool:
    """A1111's rule: split when the short side over the long side (for a square output) is at most `threshold`."""
    short, long = sorted(image_size)
    return short / long <= threshold


def split_into_tiles(image: Image.Image, size: int, overlap: float) -> list[Image.Image]:
    """Scale the short side to `size`, then cut square tiles along the long side overlapping by `overlap`.

    Same count and spacing as A1111's "Split oversized images", so an artist's settings carry over.
    """
    wide = image.width >= image.height
    scale = size / min(image.size)
    long_side = max(size, round(max(image.size) * scale))
    scaled = resize(image, (long_side, size) if wide else (size, long_side))
    count = max(2, math.ceil((long_side - size * overlap) / (size * (1.0 - overlap))))
    step = (long_side - size) / (count - 1)
    tiles = []
    for index in range(count):
        offset = int(step * index)
        box = (offset, 0, offset + size, size) if wide else (0, offset, size, offset + size)
        tiles.append(scaled.crop(box))
    return tiles


def flipped_copies(image: Image.Image, flips: tuple[str, ...] | list[str]) -> list[Image.Image]:
    """Mirror images in A1111's order: horizontal, vertical, both (rotated half a turn)."""
    copies = []
    if "horizontal" in flips:
        copies.append(ImageOps.mirror(image))
    if "vertical" in flips:
        copies.append(ImageOps.flip(image))
    if "both" in flips:
        copies.append(image.transpose(Image.Transpose.ROTATE_180))
    return copies
