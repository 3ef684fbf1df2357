"""Embeddings inside PNG images: A1111's text chunk and pixel data block (reference/a1111.md §1.9)."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from ti_trainer.embeddings import png
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import embedding_to_dict, load_embedding
from ti_trainer.embeddings.png import (
    TEXT_CHUNK_KEY,
    add_embedding_to_image,
    decode_embedding_text,
    encode_embedding_text,
    extract_embedding_data,
    save_image_with_embedding,
)
from ti_trainer.errors import UserError


def make_data(num_vectors: int = 2, width: int = 1024, seed: int = 0, name: str = "my-style-500") -> dict:
    vectors = torch.randn(num_vectors, width, generator=torch.Generator().manual_seed(seed)) * 0.02
    embedding = Embedding(name, vectors, step=500, sd_checkpoint="0123456789", sd_checkpoint_name="v2-1_768")
    return embedding_to_dict(embedding)


def make_picture(width: int = 64, height: int = 48, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def vectors_of(data: dict) -> torch.Tensor:
    return data["string_to_param"]["*"]


def strip_text_chunks(source: Path, target: Path) -> Path:
    """Re-save only the pixels, as an image host that drops PNG chunks would."""
    with Image.open(source) as image:
        Image.fromarray(np.asarray(image.convert("RGB"))).save(target, format="PNG")
    with Image.open(target) as image:
        assert TEXT_CHUNK_KEY not in image.text
    return target


def assert_same_embedding(found: dict | None, expected: dict) -> None:
    assert found is not None
    assert vectors_of(found).dtype == torch.float32
    assert torch.equal(vectors_of(found), vectors_of(expected))
    for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name", "string_to_token"):
        assert found[key] == expected[key]


def test_text_round_trip_and_a1111_json_shape():
    data = make_data()
    text = encode_embedding_text(data)
    raw = json.loads(base64.b64decode(text))
    # A1111's reader rebuilds tensors from exactly this shape: {"TORCHTENSOR": nested lists}.
    assert list(raw) == list(data)
    assert raw["string_to_param"]["*"]["TORCHTENSOR"] == vectors_of(data).tolist()
    assert raw["step"] == 500
    assert_same_embedding(decode_embedding_text(text), data)


def test_saved_png_carries_the_text_chunk_and_round_trips(tmp_path):
    data = make_data()
    path = save_image_with_embedding(make_picture(), data, tmp_path / "my-style-500.png", "<my-style-500>")
    with Image.open(path) as image:
        assert image.text[TEXT_CHUNK_KEY] == encode_embedding_text(data)
    assert_same_embedding(extract_embedding_data(path), data)
    assert [p.name for p in tmp_path.iterdir()] == ["my-style-500.png"]  # no temporary file left behind


def test_pixel_block_alone_round_trips_after_the_chunk_is_stripped(tmp_path):
    data = make_data(seed=3)
    saved = save_image_with_embedding(
        make_picture(), data, tmp_path / "a.png", "<a>", "model", "[hash]", "2v 500s"
    )
    stripped = strip_text_chunks(saved, tmp_path / "stripped.png")
    assert_same_embedding(extract_embedding_data(stripped), data)


def test_load_embedding_reads_a_saved_png(tmp_path):
    data = make_data(num_vectors=3, seed=4)
    path = save_image_with_embedding(make_picture(), data, tmp_path / "file-stem.png", "<my-style-500>")
    for source in (path, strip_text_chunks(path, tmp_path / "pixels-only.png")):
        embedding = load_embedding(source)
        assert embedding.name == "my-style-500"  # the embedded name wins over the file stem, as in A1111
        assert embedding.step == 500
        assert embedding.vectors.dtype == torch.float32
        assert torch.allclose(embedding.vectors, vectors_of(data), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("num_vectors", "width"), [(5, 1024), (1, 768)])
def test_multi_vector_and_sd1_width_survive_the_pixel_block(num_vectors, width):
    data = make_data(num_vectors, width, seed=num_vectors)
    image = add_embedding_to_image(make_picture(), data, "<t>", "left", "mid", "right")
    found = extract_embedding_data(image)
    assert_same_embedding(found, data)
    assert tuple(vectors_of(found).shape) == (num_vectors, width)


def test_output_is_wider_by_two_blocks_and_two_black_separators():
    picture = make_picture(width=64, height=48)
    data = make_data()
    out = add_embedding_to_image(picture, data, "<title>")
    assert out.mode == "RGB" and out.height == picture.height
    block_width = (out.width - picture.width - 2) // 2
    assert block_width > 0 and out.width == picture.width + 2 * block_width + 2
    # The block must hold the whole compressed payload: two nibble blocks of height x columns x 3.
    payload = zlib.compress(png._to_json(data).encode(), 9)
    assert picture.height * block_width * 3 >= len(payload)
    pixels = np.asarray(out)
    assert not pixels[:, block_width].any()
    assert not pixels[:, block_width + 1 + picture.width].any()
    assert pixels[:, :block_width].any() and pixels[:, -block_width:].any()


def test_nibble_blocks_follow_a1111_sizing():
    # Length 12, height 4: up to 16 (a full extra row even though 12 is a multiple of 4), then to 24.
    low, high = png._nibble_blocks(bytes(range(0xA0, 0xAC)), height=4)
    assert low.shape == high.shape == (4, 2, 3)
    flat_low, flat_high = low.reshape(-1), high.reshape(-1)
    assert flat_low[:12].tolist() == list(range(12)) and (flat_high[:12] == 0xA).all()
    assert flat_low[12:].tolist() == list(range(12))  # padding repeats the payload from its start
    # Length 10: up to 12, which is already a multiple of 3*4, and still a full 12 more.
    assert png._nibble_blocks(bytes(10), height=4)[0].shape == (4, 2, 3)


def test_lcg_stream_matches_the_plain_recurrence():
    expected, seed = [], 0
    for _ in range(5000):  # past several doublings of the vectorized stream
        seed = (1664525 * seed + 1013904223) % 2**32
        expected.append((seed % 255) & 0x0F)
    assert png._lcg_nibbles(5000).tolist() == expected
    assert png._lcg_nibbles(4).tolist() == [253 & 15, 242 & 15, 127 & 15, 44 & 15]


def split_blocks(out: Image.Image, picture_width: int) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(out)
    block_width = (out.width - picture_width - 2) // 2
    return pixels[:, :block_width], pixels[:, -block_width:]


def test_blocks_hold_the_scrambled_nibbles_in_a1111_order():
    picture, data = make_picture(), make_data(seed=7)
    low, high = split_blocks(add_embedding_to_image(picture, data, "<t>"), picture.width)
    payload = np.frombuffer(zlib.compress(png._to_json(data).encode(), 9), dtype=np.uint8)
    stream = png._lcg_nibbles(low.size)
    # Row-major (row, column, channel); the low nibbles on the left, the high ones on the right.
    assert ((low.reshape(-1) & 0x0F) ^ stream)[: len(payload)].tolist() == (payload & 0x0F).tolist()
    assert ((high.reshape(-1) & 0x0F) ^ stream)[: len(payload)].tolist() == (payload >> 4).tolist()


def test_dot_centres_carry_the_first_vector_shades():
    picture, data = make_picture(), make_data(seed=8)
    low, high = split_blocks(add_embedding_to_image(picture, data, "<t>"), picture.width)
    first = np.abs(vectors_of(data)[0].double().numpy())
    shades = (first / first.max() * 255).astype(np.uint8)
    tops = range(-6, picture.height, 8)
    checked = 0
    for column, left in enumerate(range(-6, low.shape[1], 8)):
        for row, top in enumerate(tops):
            # 7-px dots on an 8-px grid, even rows shifted right by 4; their centres are always filled.
            x, y = left + (4 if row % 2 == 0 else 0) + 3, top + 3
            if 0 <= x < low.shape[1] and 0 <= y < low.shape[0]:
                index = column * len(tops) + row
                assert low[y, x, 0] & 0xF0 == shades[index % len(shades)] & 0xF0
                assert high[y, x, 0] & 0xF0 == shades[::-1][index % len(shades)] & 0xF0
                checked += 1
    assert checked > 20


def test_dot_pattern_follows_the_first_vector():
    picture = make_picture()
    zero = make_data()
    zero["string_to_param"]["*"] = torch.zeros(2, 1024)
    bright = make_data()
    bright["string_to_param"]["*"] = torch.ones(2, 1024)
    for data, has_dots in ((zero, False), (bright, True)):
        pixels = np.asarray(add_embedding_to_image(picture, data, ""))
        block = pixels[:, : (pixels.shape[1] - picture.width - 2) // 2]
        assert bool((block >= 16).any()) is has_dots
        assert extract_embedding_data(Image.fromarray(pixels)) is not None


def test_ordinary_and_odd_images_give_none(tmp_path):
    plain = make_picture()
    plain.save(tmp_path / "plain.png")
    assert extract_embedding_data(tmp_path / "plain.png") is None
    # Two black columns send the reader on to zlib, which must fail quietly.
    striped = np.asarray(make_picture(seed=5)).copy()
    striped[:, 10] = 0
    striped[:, 50] = 0
    assert extract_embedding_data(Image.fromarray(striped)) is None
    for odd in (
        Image.new("RGB", (1, 1)),
        Image.new("L", (20, 20)),
        Image.new("RGBA", (30, 10), (0, 0, 0, 0)),
    ):
        assert extract_embedding_data(odd) is None
    (tmp_path / "not-an-image.png").write_text("hello")
    assert extract_embedding_data(tmp_path / "not-an-image.png") is None
    assert extract_embedding_data(tmp_path / "missing.png") is None


def test_corrupt_payloads_give_none(tmp_path):
    data = make_data()
    saved = save_image_with_embedding(make_picture(), data, tmp_path / "good.png", "<good>")

    # A truncated text chunk on an ordinary picture.
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, encode_embedding_text(data)[:-40])
    make_picture().save(tmp_path / "cut-chunk.png", pnginfo=info)
    assert extract_embedding_data(tmp_path / "cut-chunk.png") is None

    # Pixel blocks with damaged data, or one block cut short.
    pixels = np.asarray(Image.open(strip_text_chunks(saved, tmp_path / "pixels.png"))).copy()
    damaged = pixels.copy()
    damaged[:, :3] ^= 0x05
    assert extract_embedding_data(Image.fromarray(damaged)) is None
    assert extract_embedding_data(Image.fromarray(pixels[:, :-2])) is None

    # A file cut off halfway.
    (tmp_path / "cut-file.png").write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    assert extract_embedding_data(tmp_path / "cut-file.png") is None


def test_damaged_chunk_falls_back_to_the_pixel_block(tmp_path):
    data = make_data()
    image = add_embedding_to_image(make_picture(), data, "<t>")
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_CHUNK_KEY, "not base64 at all!")
    image.save(tmp_path / "mixed.png", pnginfo=info)
    assert_same_embedding(extract_embedding_data(tmp_path / "mixed.png"), data)


def test_preview_files_are_ignored_like_a1111(tmp_path):
    saved = save_image_with_embedding(make_picture(), make_data(), tmp_path / "x.png", "<x>")
    preview = saved.rename(tmp_path / "x.Preview.png")
    assert extract_embedding_data(preview) is None
    with pytest.raises(UserError, match="preview"):
        save_image_with_embedding(make_picture(), make_data(), tmp_path / "y.preview.png", "<y>")
    with pytest.raises(UserError, match=r"\.png"):
        save_image_with_embedding(make_picture(), make_data(), tmp_path / "y.webp", "<y>")
