"""Embeddings carried inside PNG images, in A1111's format (reference/a1111.md §1.9).

Each image carries the embedding twice. The `sd-ti-embedding` text chunk is easy to read but many sites and
editors strip chunks. The pixel data block, drawn beside the picture, survives that (not lossy re-encoding).
A1111 reads the chunk first and falls back to the pixels; so do we. Both copies hold the same JSON, with
every tensor written as `{"TORCHTENSOR": nested lists}`.

The pixel block, byte for byte as A1111 draws it: zlib (level 9) of the JSON, split into high and low nibbles,
each laid out as an RGB block as tall as the picture; a dot pattern shaded by the first vector is XORed into
the upper bits (decoration only: readers keep the low nibble), then a fixed LCG stream into the low bits.
Layout: low block | 1 black column | picture | 1 black column | high block.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from ti_trainer.embeddings.checks import require_finite_on_save, tensors_in
from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write

TEXT_CHUNK_KEY = "sd-ti-embedding"
_TENSOR_KEY = "TORCHTENSOR"

# A1111's scrambling stream: x <- (a*x + c) mod 2^32 from seed 0; each value is taken mod 255.
_LCG_A = 1664525
_LCG_C = 1013904223
_LCG_M = 2**32

# The dot pattern uses at most this many values of the first vector, as A1111 does.
_DOT_SHADES = 1024

# A 75-vector SD2 embedding is under 2 MB of JSON; the cap stops a crafted image from inflating without end.
_MAX_JSON_BYTES = 64 * 2**20

# Glyphs spanning a line's full height, used to size caption text by the line rather than by its own glyphs.
_LINE_GLYPHS = "Hg[]|"


def encode_embedding_text(data: dict) -> str:
    """The value of A1111's `sd-ti-embedding` text chunk: base64 of the JSON."""
    return base64.b64encode(_to_json(data).encode("utf-8")).decode("ascii")


def decode_embedding_text(text: str) -> dict:
    """Inverse of `encode_embedding_text`; tensors come back float32. Raises ValueError on damaged text."""
    return _from_json(base64.b64decode(text))


def add_embedding_to_image(
    image: Image.Image,
    data: dict,
    title: str,
    footer_left: str = "",
    footer_mid: str = "",
    footer_right: str = "",
) -> Image.Image:
    """A new RGB image: the picture captioned, with the embedding's pixel data block on both sides."""
    captioned = _caption_overlay(image, title, footer_left, footer_mid, footer_right)
    return _attach_data_block(captioned, data)


def save_image_with_embedding(
    image: Image.Image,
    data: dict,
    path: Path | str,
    title: str,
    footer_left: str = "",
    footer_mid: str = "",
    footer_right: str = "",
) -> Path:
    """Write a PNG holding the embedding both as the text chunk and as the pixel block, atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"Cannot save an image embedding as {path.name}: the file name must end in .png.")
    if _is_preview_name(path):
        raise UserError(
            f"{path.name}: A1111 ignores files named *.preview.png (it takes them for thumbnails). "
            "Choose a name without '.preview'."
        )
    for tensor in tensors_in(data):
        require_finite_on_save(tensor, path)
    picture = add_embedding_to_image(image, data, title, footer_left, footer_mid, footer_right)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, encode_embedding_text(data))
    # The temporary file's name ends in .tmp, so the format is named explicitly.
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", pnginfo=info))


def extract_embedding_data(source: Path | str | Image.Image) -> dict | None:
    """The embedding dict an image carries (text chunk first, then pixels), or None if it carries none.

    Never raises for an unreadable, ordinary or damaged image: None means "no embedding here", which is how
    A1111 treats such files in its embeddings folder (they are previews). Like A1111, `*.preview.png` files
    are not looked into.
    """
    if isinstance(source, Image.Image):
        return _extract_from_image(source)
    path = Path(source)
    if _is_preview_name(path):
        return None
    try:
        with Image.open(path) as image:
            return _extract_from_image(image)
    except Exception:  # PIL raises many types for broken files (OSError, ValueError, SyntaxError, ...)
        return None


def _is_preview_name(path: Path) -> bool:
    return Path(path.stem).suffix.lower() == ".preview"


def _extract_from_image(image: Image.Image) -> dict | None:
    text = _text_chunk(image)
    if text is not None:
        try:
            data = decode_embedding_text(text)
            if _holds_vectors(data):
                return data
        except (ValueError, TypeError, RuntimeError):
            pass  # a damaged chunk: the pixel copy may still be whole (A1111 would give up here)
    try:
        data = _read_data_block(image)
    except Exception:  # garbage where a block should be fails in zlib, JSON, torch or PIL: no embedding
        return None
    return data if data is not None and _holds_vectors(data) else None


def _text_chunk(image: Image.Image) -> str | None:
    try:
        # `.text` also reads chunks stored after the pixel data; it loads the image, which may fail.
        chunks = getattr(image, "text", None) or image.info
    except Exception:  # a truncated or damaged file: no text to read
        chunks = image.info
    value = chunks.get(TEXT_CHUNK_KEY)
    return value if isinstance(value, (str, bytes)) else None


def _holds_vectors(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    params = data.get("string_to_param")
    values = params.values() if isinstance(params, dict) else data.values()
    return any(isinstance(value, torch.Tensor) for value in values)


# --- JSON with tensors ---------------------------------------------------------------------------------


def _to_json(data: dict) -> str:
    def tensor_as_lists(value: Any) -> dict:
        if isinstance(value, torch.Tensor):
            return {_TENSOR_KEY: value.detach().to("cpu", torch.float32).tolist()}
        raise TypeError(f"A {type(value).__name__} cannot be stored in an image embedding.")

    # Default separators and ASCII escaping, as A1111's encoder: the same dict gives the same bytes.
    return json.dumps(data, default=tensor_as_lists)


def _from_json(text: str | bytes) -> dict:
    def lists_as_tensor(obj: dict) -> Any:
        if _TENSOR_KEY in obj:
            return torch.tensor(obj[_TENSOR_KEY], dtype=torch.float32)
        return obj

    data = json.loads(text, object_hook=lists_as_tensor)
    if not isinstance(data, dict):
        raise ValueError("the embedding data is not a JSON object")
    return data


# --- the pixel data block ------------------------------------------------------------------------------


def _attach_data_block(image: Image.Image, data: dict) -> Image.Image:
    payload = zlib.compress(_to_json(data).encode("utf-8"), 9)
    low, high = _nibble_blocks(payload, image.height)
    shades = _dot_shades(_shading_vectors(data))
    low = _scramble(low ^ _dot_pattern(low.shape, shades))
    high = _scramble(high ^ _dot_pattern(high.shape, shades[::-1]))

    block_width = low.shape[1]
    # A black canvas: the two columns left uncovered are the separators readers look for.
    out = Image.new("RGB", (block_width + 1 + image.width + 1 + block_width, image.height))
    out.paste(Image.fromarray(low), (0, 0))
    out.paste(image.convert("RGB"), (block_width + 1, 0))
    out.paste(Image.fromarray(high), (block_width + 1 + image.width + 1, 0))
    return out


def _shading_vectors(data: dict) -> torch.Tensor:
    """The vectors the dots are shaded by: A1111's `string_to_param` term; for an SDXL dict, which A1111 never
    draws, its `clip_l` (the first encoder's). The dots are decoration: readers keep only the low nibbles."""
    params = data.get("string_to_param")
    if isinstance(params, dict) and params:
        return next(iter(params.values()))
    if isinstance(data.get("clip_l"), torch.Tensor):
        return data["clip_l"]
    raise ValueError(
        "The pixel data block needs an embedding dict: 'string_to_param', or SDXL's clip_l/clip_g."
    )


def _nibble_blocks(payload: bytes, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Low and high nibbles of `payload`, each shaped `(height, columns, 3)`."""
    values = np.frombuffer(payload, dtype=np.uint8)
    # A1111's sizing: round up to a multiple of the height, then of 3*height, each step adding a full
    # row's worth even when already a multiple. The gap is filled by repeating the payload from its start
    # (zlib ignores what follows its stream). Matching this keeps our images pixel-identical to A1111's.
    size = len(values) + height - len(values) % height
    size += 3 * height - size % (3 * height)
    padded = np.resize(values, size).reshape(height, -1, 3)
    return padded & 0x0F, padded >> 4


def _dot_shades(vectors: torch.Tensor) -> np.ndarray:
    """Grey levels from the first vector: |v| scaled so its largest value is 255."""
    vectors = torch.as_tensor(vectors).detach().to("cpu", torch.float64)
    first = vectors.reshape(-1, vectors.shape[-1])[0]
    magnitudes = np.abs(first[:_DOT_SHADES].numpy())
    peak = magnitudes.max() if magnitudes.size else 0.0
    if not np.isfinite(peak) or peak <= 0:
        return np.zeros(max(1, magnitudes.size), dtype=np.uint8)  # an all-zero vector: plain black dots
    return np.nan_to_num(magnitudes / peak * 255).astype(np.uint8)


def _dot_pattern(shape: tuple[int, ...], shades: np.ndarray) -> np.ndarray:
    """Upper-nibble decoration: 7-px dots on an 8-px grid, every other row of dots shifted right by 4."""
    height, width = shape[0], shape[1]
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    tops = range(-6, height, 8)
    for column, left in enumerate(range(-6, width, 8)):
        for row, top in enumerate(tops):
            # Shades are used column by column, top to bottom, cycling when the vector runs out.
            grey = int(shades[(column * len(tops) + row) % len(shades)])
            shift = 4 if row % 2 == 0 else 0
            draw.ellipse((left + shift, top, left + shift + 6, top + 6), fill=(grey, grey, grey))
    return np.asarray(canvas, dtype=np.uint8) & 0xF0


def _lcg_nibbles(count: int) -> np.ndarray:
    """The first `count` values of A1111's LCG stream, each mod 255 and masked to the low nibble."""
    # Built by doubling, not one value per Python step (an extraction attempt on a large ordinary image
    # needs millions): if x[i+n] = mul*x[i] + add for every i, the next n values are one multiply-add.
    # uint32 arithmetic wraps, which is exactly mod 2^32.
    seeds = np.array([_LCG_C % _LCG_M], dtype=np.uint32)  # the first value, from seed 0
    mul, add = _LCG_A, _LCG_C
    while len(seeds) < count:
        seeds = np.concatenate([seeds, seeds * np.uint32(mul) + np.uint32(add)])
        mul, add = (mul * mul) % _LCG_M, (mul * add + add) % _LCG_M
    return ((seeds[:count] % 255) & 0x0F).astype(np.uint8)


def _scramble(block: np.ndarray) -> np.ndarray:
    """XOR the low nibbles with the LCG stream (its own inverse)."""
    return block.astype(np.uint8) ^ _lcg_nibbles(block.size).reshape(block.shape)


def _read_data_block(image: Image.Image) -> dict | None:
    pixels = _crop_black_border(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    empty_columns = np.flatnonzero(~pixels.any(axis=(0, 2)))
    if len(empty_columns) < 2:
        return None
    # The outermost empty columns are the separators; anything empty in the picture lies between them.
    low = pixels[:, : empty_columns[0]]
    high = pixels[:, empty_columns[-1] + 1 :]
    if low.size == 0 or low.shape != high.shape:
        return None
    payload = (_scramble(high) << 4) | _scramble(low)
    return _from_json(_inflate(payload.tobytes()))


def _crop_black_border(pixels: np.ndarray) -> np.ndarray:
    """Drop outer rows and columns holding no pixel whose three channels are all non-zero (as A1111 does)."""
    lit = (pixels > 0).all(axis=2)
    rows, columns = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if rows.size == 0:
        return pixels
    return pixels[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]


def _inflate(compressed: bytes) -> bytes:
    inflater = zlib.decompressobj()
    text = inflater.decompress(compressed, _MAX_JSON_BYTES)
    if not inflater.eof:
        raise ValueError("the embedding data is truncated, damaged or too large")
    return text


# --- caption -------------------------------------------------------------------------------------------


def _caption_overlay(image: Image.Image, title: str, left: str, mid: str, right: str) -> Image.Image:
    """Darken the top and bottom edges and write the title top-left and three footers, sized to the image."""
    canvas = image.convert("RGBA")
    canvas.alpha_composite(_edge_shade(canvas.size))
    width, height = canvas.size
    padding = max(1, round(min(width, height) * 0.02))

    title_mask = _text_mask(title, max_width=width * 0.75 - 2 * padding, max_height=height * 0.09)
    if title_mask is not None:
        _draw_mask(canvas, title_mask, (padding, padding))

    # One size for all three footers, the largest at which each fits in a third of the width.
    footer_height = height * 0.05
    for text in (left, mid, right):
        natural = _text_mask(text, max_width=width / 3 - padding, max_height=footer_height)
        if natural is not None:
            footer_height = min(footer_height, natural.height)
    for text, align in ((left, 0.0), (mid, 0.5), (right, 1.0)):
        mask = _text_mask(text, max_width=width, max_height=footer_height)
        if mask is not None:
            x = padding + align * (width - 2 * padding - mask.width)
            _draw_mask(canvas, mask, (round(x), height - padding - mask.height))
    return canvas.convert("RGB")


def _edge_shade(size: tuple[int, int]) -> Image.Image:
    """Black with alpha rising towards the top and bottom edges, so white text stays readable."""
    width, height = size
    distance = np.minimum(np.arange(height), np.arange(height)[::-1]) / max(1, height)
    alpha = (np.clip(1 - distance / 0.3, 0, 1) ** 1.5 * 200).astype(np.uint8)
    shade = Image.new("RGBA", size)
    shade.putalpha(Image.fromarray(np.repeat(alpha[:, None], width, axis=1)))
    return shade


def _text_mask(text: str, max_width: float, max_height: float) -> Image.Image | None:
    """`text` as a greyscale mask, as large as fits the box; None if empty or too small to read."""
    if not text or max_height < 4 or max_width < 4:
        return None
    font = _default_font(max(8, round(max_height)))
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    # Height from tall and deep glyphs too, so strings drawn to the same height share one font size.
    _, line_top, _, line_bottom = probe.textbbox((0, 0), _LINE_GLYPHS, font=font)
    top, bottom = min(top, line_top), max(bottom, line_bottom)
    if right <= left or bottom <= top:
        return None
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    scale = min(max_width / mask.width, max_height / mask.height)
    size = (max(1, round(mask.width * scale)), max(1, round(mask.height * scale)))
    if size[1] < 4:
        return None
    return mask.resize(size, Image.Resampling.LANCZOS)


def _default_font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, so captions need no font file and no download."""
    try:
        return ImageFont.load_default(size=size_px)  # Pillow >= 10.1 scales it
    except TypeError:
        return ImageFont.load_default()  # older Pillow (A1111 pins 9.5): a small bitmap font, resized after


def _draw_mask(canvas: Image.Image, mask: Image.Image, position: tuple[int, int]) -> None:
    """Composite white text, slightly translucent, through `mask` onto the RGBA canvas."""
    layer = Image.new("RGBA", mask.size, (255, 255, 255, 0))
    layer.putalpha(mask.point(lambda value: value * 230 // 255))
    canvas.alpha_composite(layer, dest=(max(0, position[0]), max(0, position[1])))
