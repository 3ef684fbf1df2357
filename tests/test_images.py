"""Image and caption loading: every mode becomes RGB, bad files are skipped with a reason, sources untouched."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ti_trainer.errors import UserError
from ti_trainer.fsutil import read_text_file
from ti_trainer.images import (
    IMAGE_SUFFIXES,
    ImageLoadError,
    caption_for,
    load_folder,
    load_image,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def close_to(pixel, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=True))


def save_png(path: Path, size=(16, 16), color=RED) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def noisy_png_bytes(size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def folder_fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --- modes and orientation ---------------------------------------------------------------------------------


def test_image_suffixes_cover_common_formats():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= set(IMAGE_SUFFIXES)


def test_exif_orientation_is_applied(tmp_path):
    # Stored landscape: red left half, blue right half. Orientation 6 says "rotate 90° clockwise to view",
    # so the viewer sees a portrait image with red on top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)

    image = load_image(path)

    assert image.size == (20, 40)
    assert close_to(image.getpixel((10, 5)), RED, tolerance=40)
    assert close_to(image.getpixel((10, 35)), BLUE, tolerance=40)


def _half_transparent_rgba() -> Image.Image:
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # hidden colour under alpha 0 is black
    image.paste((255, 0, 0, 255), (0, 0, 4, 8))
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    source = _half_transparent_rgba()
    (source if mode == "RGBA" else source.convert("LA")).save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((6, 4)) == WHITE
    opaque = image.getpixel((1, 4))
    if mode == "RGBA":
        assert opaque == RED
    else:  # LA is grey: red becomes a mid grey, still darker than the white background
        assert opaque[0] == opaque[1] == opaque[2] < 200


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_keep_alpha_returns_rgba_with_its_alpha(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    source = _half_transparent_rgba()
    (source if mode == "RGBA" else source.convert("LA")).save(path)

    image = load_image(path, keep_alpha=True)

    assert image.mode == "RGBA"
    assert image.getpixel((6, 4))[3] == 0
    assert image.getpixel((1, 4))[3] == 255


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), index 1 red
    image.paste(1, (0, 0, 4, 8))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)

    rgb = load_image(path)
    rgba = load_image(path, keep_alpha=True)

    assert rgb.mode == "RGB"
    assert rgb.getpixel((6, 4)) == WHITE
    assert rgb.getpixel((1, 4)) == RED
    assert rgba.mode == "RGBA"
    assert rgba.getpixel((6, 4))[3] == 0


def test_keep_alpha_on_an_opaque_image_gives_rgb(tmp_path):
    path = save_png(tmp_path / "opaque.png")
    assert load_image(path, keep_alpha=True).mode == "RGB"


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_becomes_rgb(tmp_path, suffix):
    path = tmp_path / f"cmyk{suffix}"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert close_to(image.getpixel((4, 4)), RED, tolerance=20)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # Pillow's plain convert("RGB") clips 16-bit values to white; mid-grey must stay mid-grey.
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")

    image = load_image(path)

    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_float_grayscale_in_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(path)

    image = load_image(path)

    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize(
    "mode, value, expected", [("L", 100, (100, 100, 100)), ("1", 1, WHITE), ("1", 0, (0, 0, 0))]
)
def test_grayscale_and_bilevel_become_rgb(tmp_path, mode, value, expected):
    path = tmp_path / f"gray_{mode}_{value}.png"
    Image.new(mode, (4, 4), value).save(path)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == expected


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in (RED, (0, 255, 0), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 3

    image = load_image(path)

    assert image.mode == "RGB"
    assert close_to(image.getpixel((4, 4)), RED)


def test_loaded_image_is_usable_after_the_file_is_closed(tmp_path):
    path = save_png(tmp_path / "plain.png", color=BLUE)
    image = load_image(path)
    path.unlink()  # the pixels must be in memory, not behind a closed file handle
    assert image.getpixel((0, 0)) == BLUE
    assert np.asarray(image).shape == (16, 16, 3)


# --- files that cannot be used -----------------------------------------------------------------------------


def _write_bad_files(folder: Path) -> dict[str, str]:
    """Each bad file name -> a word its reason must contain."""
    data = noisy_png_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file with the wrong name\n")
    return {"cut.png": "truncated", "empty.jpg": "0 bytes", "notes.png": "not an image"}


def test_bad_files_raise_image_load_error_naming_the_file(tmp_path):
    for name, reason_word in _write_bad_files(tmp_path).items():
        with pytest.raises(ImageLoadError) as caught:
            load_image(tmp_path / name)
        assert reason_word in caught.value.reason
        assert name in str(caught.value)
        assert isinstance(caught.value, UserError)


def test_image_load_error_survives_pickling(tmp_path):
    error = pickle.loads(pickle.dumps(ImageLoadError(tmp_path / "x.png", "file is truncated")))
    assert (error.path, error.reason) == (tmp_path / "x.png", "file is truncated")
    assert "x.png" in str(error)


# A 20x20 image has 400 pixels: over twice the limit raises PIL's error, over the limit only its warning.
@pytest.mark.parametrize("limit", [50, 300])
def test_decompression_bomb_is_a_problem_not_a_crash(tmp_path, monkeypatch, limit):
    path = save_png(tmp_path / "huge.png", size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)

    with pytest.raises(ImageLoadError) as caught:
        load_image(path)

    assert "too large" in caught.value.reason
    assert "huge.png" in str(caught.value)


def test_folder_skips_bad_files_and_keeps_good_ones(tmp_path, monkeypatch):
    expected_reasons = _write_bad_files(tmp_path)
    save_png(tmp_path / "huge.png", size=(120, 120))
    expected_reasons["huge.png"] = "too large"
    save_png(tmp_path / "good.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 + 1)  # the truncated 64x64 file stays under it

    result = load_folder(tmp_path)

    assert [item.path.name for item in result.images] == ["good.png"]
    reasons = {problem.path.name: problem.reason for problem in result.skipped}
    assert reasons.keys() == expected_reasons.keys()
    for name, word in expected_reasons.items():
        assert word in reasons[name]


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist") as caught:
        load_folder(tmp_path / "nowhere")
    assert "nowhere" in str(caught.value)


def test_file_given_as_folder(tmp_path):
    path = save_png(tmp_path / "one.png")
    with pytest.raises(UserError, match="not a folder"):
        load_folder(path)


def test_empty_folder_and_folder_without_images(tmp_path):
    with pytest.raises(UserError, match="no image files") as caught:
        load_folder(tmp_path)
    assert str(tmp_path) in str(caught.value)

    (tmp_path / "caption.txt").write_text("a caption without its image")
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(UserError, match="no image files"):
        load_folder(tmp_path)


def test_images_in_subfolders_are_not_used_and_the_message_says_so(tmp_path):
    (tmp_path / "processed").mkdir()
    save_png(tmp_path / "processed" / "a.png")
    with pytest.raises(UserError, match="sub-folders") as caught:
        load_folder(tmp_path)
    assert "processed" in str(caught.value)


def test_folder_of_only_unreadable_files_lists_each(tmp_path):
    expected = _write_bad_files(tmp_path)

    with pytest.raises(UserError) as caught:
        load_folder(tmp_path)

    message = str(caught.value)
    assert str(tmp_path) in message
    for name, word in expected.items():
        line = next(line for line in message.splitlines() if name in line)
        assert word in line


# --- folder listing and captions ---------------------------------------------------------------------------


def test_folder_order_suffixes_and_captions(tmp_path):
    save_png(tmp_path / "b.PNG")
    save_png(tmp_path / "a.jpg")
    save_png(tmp_path / "00012-0-red fox.webp")
    (tmp_path / "a.txt").write_text("  a cat, sitting \n", encoding="utf-8")
    (tmp_path / "Thumbs.db").write_bytes(b"\x00\x01")
    (tmp_path / "orphan.txt").write_text("no image here")
    sub = tmp_path / "more"
    sub.mkdir()
    save_png(sub / "nested.png")

    result = load_folder(tmp_path)

    assert [(item.path.name, item.caption) for item in result.images] == [
        ("00012-0-red fox.webp", "red fox"),
        ("a.jpg", "a cat, sitting"),
        ("b.PNG", "b"),
    ]
    assert result.skipped == []
    assert all(item.image.mode == "RGB" for item in result.images)


def test_loading_never_modifies_the_source_folder(tmp_path):
    _write_bad_files(tmp_path)
    stored = Image.new("RGB", (40, 20), BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif)
    _half_transparent_rgba().save(tmp_path / "alpha.png")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    (tmp_path / "alpha.txt").write_bytes("\ufeffcaption with bom".encode())
    before = folder_fingerprint(tmp_path)

    load_folder(tmp_path)
    load_folder(tmp_path, keep_alpha=True, filename_regex=r"\w+", join_string="_")

    assert folder_fingerprint(tmp_path) == before


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b" plain caption \n", "plain caption"),
        ("\ufeffbom café\n".encode(), "bom café"),
        (" utf16 café\r\n".encode("utf-16"), "utf16 café"),
        ("\ufeffutf16be café".encode("utf-16-be"), "utf16be café"),
        (" latin café ".encode("latin-1"), "latin café"),
        ("windows \u201cquotes\u201d".encode("cp1252"), "windows \u201cquotes\u201d"),
        (b"\x81\x8d undefined in cp1252", "\x81\x8d undefined in cp1252"),
    ],
)
def test_caption_file_encodings(tmp_path, raw, expected):
    image = save_png(tmp_path / "img.png")
    (tmp_path / "img.txt").write_bytes(raw)
    assert caption_for(image) == expected


def test_read_text_file_never_fails_on_bytes(tmp_path):
    path = tmp_path / "bytes.txt"
    path.write_bytes(bytes(range(256)))
    assert len(read_text_file(path)) == 256


def test_caption_from_file_name_strips_leading_numbers(tmp_path):
    assert caption_for(tmp_path / "00003-1-a red fox.png") == "a red fox"
    assert caption_for(tmp_path / "2023 sunset.jpg") == "sunset"
    assert caption_for(tmp_path / "fox-2.png") == "fox-2"


def test_caption_file_beats_file_name(tmp_path):
    image = save_png(tmp_path / "00001-red_fox.png")
    (tmp_path / "00001-red_fox.txt").write_text("from the file")
    assert caption_for(image, filename_regex="[a-z]+") == "from the file"


def test_caption_regex_and_join_string(tmp_path):
    path = tmp_path / "00003-red_fox_in_snow.png"
    assert caption_for(path, filename_regex="[a-z]+") == "red fox in snow"
    assert caption_for(path, filename_regex="[a-z]+", join_string=", ") == "red, fox, in, snow"
    assert caption_for(path, filename_regex="([a-z]+)_") == "red fox in"  # one group: findall gives the group
    assert caption_for(path, filename_regex="([a-z]+)_(in)") == "fox_in"  # several groups: the whole match


def test_invalid_regex_is_a_user_error_with_an_example(tmp_path):
    image = save_png(tmp_path / "a.png")
    with pytest.raises(UserError, match="not a valid regular expression") as caught:
        caption_for(image, filename_regex="([a-z")
    assert "For example" in str(caught.value)
    with pytest.raises(UserError, match=r"\(\[a-z"):
        load_folder(tmp_path, filename_regex="([a-z")


def test_load_folder_applies_regex_and_keep_alpha(tmp_path):
    _half_transparent_rgba().save(tmp_path / "01-red_fox.png")
    result = load_folder(tmp_path, keep_alpha=True, filename_regex="[a-z]+", join_string="+")
    (item,) = result.images
    assert item.caption == "red+fox"
    assert item.image.mode == "RGBA"
