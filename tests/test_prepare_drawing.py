"""Images the dataset-preparation tests draw for themselves, and checks that the drawings do their job.

A face simple enough to draw yet real enough for OpenCV's Haar cascade; smooth "paintings" in a chosen
colour family; a busy image full of branches; bad files of every kind an artist's folder may hold.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ti_trainer.prepare.focal import detect_faces


def draw_face(side: int = 200) -> Image.Image:
    """A frontal face: hair, skin oval, brows, eyes with pupils, nose shadow, mouth, softened like a photo."""
    image = Image.new("RGB", (side, side), (60, 60, 70))
    draw = ImageDraw.Draw(image)
    s = side / 200

    def oval(box, fill):
        draw.ellipse([v * s for v in box], fill=fill)

    oval((35, 15, 165, 130), (40, 30, 20))
    oval((45, 30, 155, 185), (225, 185, 160))
    draw.rectangle([62 * s, 68 * s, 92 * s, 74 * s], fill=(50, 35, 25))
    draw.rectangle([108 * s, 68 * s, 138 * s, 74 * s], fill=(50, 35, 25))
    oval((65, 82, 90, 96), (255, 255, 255))
    oval((110, 82, 135, 96), (255, 255, 255))
    oval((71, 83, 84, 95), (30, 20, 15))
    oval((116, 83, 129, 95), (30, 20, 15))
    draw.polygon([(100 * s, 95 * s), (92 * s, 130 * s), (108 * s, 130 * s)], fill=(200, 155, 130))
    oval((80, 145, 120, 160), (150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(2 * s))


def face_scene(size: tuple[int, int] = (900, 400), face_side: int = 240, face_left: int = 620) -> Image.Image:
    """A wide picture with a face near its right edge: a centre crop cuts it, a focal crop keeps it."""
    scene = Image.new("RGB", size, (90, 110, 130))
    scene.paste(draw_face(face_side), (face_left, (size[1] - face_side) // 2))
    return scene


def painting(seed: int, hue_rgb: tuple[int, int, int], size: tuple[int, int] = (160, 160)) -> Image.Image:
    """A soft random "landscape" in the colour family of `hue_rgb`: gradients and blobs, no hard detail."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    light = 0.6 + 0.25 * np.sin(x * rng.uniform(2, 5) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 5))
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        light += 0.15 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)
    base = np.array(hue_rgb, dtype=np.float64) * rng.uniform(0.9, 1.1, 3)
    pixels = np.clip(light[..., None] * base[None, None, :], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(2))


def busy_branches(
    seed: int, hue_rgb: tuple[int, int, int], size: tuple[int, int] = (160, 160)
) -> Image.Image:
    """The same colours as `painting`, covered in thin dark branches: the image that "takes over"."""
    image = painting(seed, hue_rgb, size)
    rng = np.random.default_rng(seed + 1000)
    draw = ImageDraw.Draw(image)
    for _ in range(220):
        x, y = rng.uniform(0, size[0]), rng.uniform(0, size[1])
        dx, dy = rng.normal(0, 14, 2)
        draw.line([(x, y), (x + dx, y + dy)], fill=(20, 25, 20), width=1)
    return image


BLUE_GREEN = (70, 140, 150)
ORANGE = (250, 150, 60)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid PNG header claiming a gigantic image, with almost no data: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def folder_fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` (recursively) with its SHA-256: byte-for-byte comparison of a whole tree."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


# --- the drawings do their job ------------------------------------------------------------------------------


def gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))


def test_drawn_face_fires_the_haar_cascade():
    scene = face_scene()
    faces = detect_faces(gray(scene))
    assert len(faces) == 1
    x, y, w, h = faces[0]
    assert 620 <= x + w / 2 <= 860  # where the face was pasted


def test_a_faceless_painting_finds_no_face():
    assert detect_faces(gray(painting(0, BLUE_GREEN, (400, 400)))) == []


def test_bomb_png_claims_its_size_without_the_pixels():
    with Image.open(io.BytesIO(bomb_png(300, 200))) as opened:
        assert opened.size == (300, 200)
    assert len(bomb_png()) < 200
