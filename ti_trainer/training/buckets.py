"""Image sizes for training: exact size with a centre crop, original size, or aspect-ratio buckets."""

from __future__ import annotations

from PIL import Image

BUCKET_STEP = 64  # bucket sides are multiples of 64 px (8 latent pixels)


def aspect_buckets(width: int, height: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Sizes with sides in steps of 64 whose area is at most width*height, from 1:max_ratio to max_ratio:1."""
    area = width * height
    sizes = set()
    side = BUCKET_STEP
    while side <= int((area * max_ratio) ** 0.5):
        other = (area // side) // BUCKET_STEP * BUCKET_STEP
        if other >= BUCKET_STEP and max(side, other) / min(side, other) <= max_ratio:
            sizes.add((side, other))
            sizes.add((other, side))
        side += BUCKET_STEP
    sizes.add((width, height))
    return sorted(sizes)


def nearest_bucket(image_size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = image_size[0] / image_size[1]
    return min(buckets, key=lambda size: (abs(size[0] / size[1] - ratio), -size[0] * size[1]))


def cover_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers `size`, then crop the centre: no stretching (A1111 stretches)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def training_size(
    image: Image.Image, width: int, height: int, keep_size: bool, buckets: list | None
) -> tuple:
    if keep_size:
        # Sides must be multiples of 8 for the VAE; trim at most 7 px.
        return (image.width - image.width % 8, image.height - image.height % 8)
    if buckets:
        return nearest_bucket(image.size, buckets)
    return (width, height)
