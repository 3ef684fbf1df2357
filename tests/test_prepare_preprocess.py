"""Preparing a dataset: crops, tiles, flips, captions, bad files named and skipped, the source untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_prepare_drawing import (
    BLUE_GREEN,
    bomb_png,
    draw_face,
    face_scene,
    folder_fingerprint,
    gray,
    painting,
    png_bytes,
)

from ti_trainer.errors import UserError
from ti_trainer.prepare.focal import FocalWeights, detect_faces, find_focal_point
from ti_trainer.prepare.geometry import bucket_size
from ti_trainer.prepare.preprocess import PrepareOptions, prepare_dataset

REPO = Path(__file__).resolve().parents[1]


def outputs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def source_with(tmp_path: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """A source folder of soft paintings, one per file name, each of the given size."""
    source = tmp_path / "src"
    source.mkdir()
    for seed, (name, size) in enumerate(sizes.items()):
        painting(seed, BLUE_GREEN, size).save(source / name)
    return source


def test_centre_crop_gives_squares_of_the_output_size(tmp_path):
    source = source_with(tmp_path, {"wide.png": (300, 200), "tall.jpg": (200, 300)})
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=128))
    assert [p.name for p in result.written] == ["00000-0-tall.png", "00001-0-wide.png"]
    assert all(Image.open(p).size == (128, 128) for p in result.written)
    assert result.skipped == [] and result.flagged == []
    # Centre crop: the middle of the source, scaled.
    expected = ImageOps.fit(painting(0, BLUE_GREEN, (300, 200)), (128, 128), Image.LANCZOS)
    got = np.asarray(Image.open(result.written[1]), dtype=int)
    assert np.abs(got - np.asarray(expected, dtype=int)).mean() < 3


def test_focal_crop_keeps_the_face_that_the_centre_crop_cuts(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    face_scene().save(source / "portrait.png")
    centre = prepare_dataset(source, tmp_path / "centre", PrepareOptions(size=256, crop="center"))
    focal = prepare_dataset(source, tmp_path / "focal", PrepareOptions(size=256, crop="focal"))
    assert detect_faces(gray(Image.open(centre.written[0]))) == []
    assert len(detect_faces(gray(Image.open(focal.written[0])))) == 1


def test_focal_point_follows_detail_when_faces_are_off():
    scene = Image.new("RGB", (600, 200), (120, 120, 120))
    noise = np.random.default_rng(0).integers(0, 255, (200, 150, 3), dtype=np.uint8)
    scene.paste(Image.fromarray(noise), (20, 0))
    point = find_focal_point(scene, FocalWeights(faces=0.0, entropy=1.0, edges=0.0))
    assert point.x < 0.35
    assert find_focal_point(draw_face(100)).x == 0.5  # a square image has only one square crop


def test_keep_aspect_writes_the_training_bucket(tmp_path):
    source = source_with(tmp_path, {"landscape.png": (900, 600)})
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=512, crop="keep"))
    width, height = Image.open(result.written[0]).size
    assert (width, height) == bucket_size((900, 600), 512)
    assert width > height and width % 64 == 0 and height % 64 == 0 and width * height <= 512 * 512


def test_split_oversized_into_overlapping_tiles_like_a1111(tmp_path):
    source = source_with(tmp_path, {"panorama.png": (1200, 300), "square.png": (300, 300)})
    options = PrepareOptions(size=256, split=True, split_threshold=0.5, split_overlap=0.2)
    result = prepare_dataset(source, tmp_path / "out", options)
    tiles = [p for p in result.written if "panorama" in p.name]
    # Scaled to 1024x256: ceil((1024 - 0.2*256) / (0.8*256)) = 5 tiles, evenly spaced from edge to edge.
    assert len(tiles) == 5
    assert all(Image.open(p).size == (256, 256) for p in tiles)
    assert len([p for p in result.written if "square" in p.name]) == 1
    scaled = np.asarray(painting(0, BLUE_GREEN, (1200, 300)).resize((1024, 256), Image.LANCZOS), dtype=int)
    assert np.abs(np.asarray(Image.open(tiles[-1]), dtype=int) - scaled[:, -256:]).mean() < 3


def test_flipped_copies_mirror_the_crop(tmp_path):
    source = source_with(tmp_path, {"a.png": (200, 200)})
    (source / "a.txt").write_text("a hill", encoding="utf-8")
    options = PrepareOptions(size=128, flips=("horizontal", "vertical", "both"))
    written = prepare_dataset(source, tmp_path / "out", options).written
    original, horizontal, vertical, both = (np.asarray(Image.open(p)) for p in written)
    assert np.array_equal(horizontal, original[:, ::-1])
    assert np.array_equal(vertical, original[::-1, :])
    assert np.array_equal(both, original[::-1, ::-1])
    assert all(p.with_suffix(".txt").read_text(encoding="utf-8") == "a hill" for p in written)


def test_images_smaller_than_the_output_are_flagged_but_kept(tmp_path):
    source = source_with(tmp_path, {"small.png": (300, 200), "large.png": (800, 800)})
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=512))
    assert len(result.written) == 2
    assert [p.path.name for p in result.flagged] == ["small.png"]
    assert "blurry" in result.flagged[0].reason and "2.6x" in result.flagged[0].reason


def bad_source_folder(root: Path) -> Path:
    """A folder with a few good images and every kind of bad or awkward file an artist's folder holds."""
    source = root / "src"
    source.mkdir()
    painting(0, BLUE_GREEN, (256, 256)).save(source / "good.png")
    (source / "good.txt").write_text("a quiet lake", encoding="utf-8")
    (source / "truncated.png").write_bytes(png_bytes(painting(1, BLUE_GREEN, (256, 256)))[:600])
    (source / "empty.jpg").write_bytes(b"")
    (source / "notes.jpg").write_text("this is not a picture", encoding="utf-8")
    (source / "bomb.png").write_bytes(bomb_png())
    painting(2, BLUE_GREEN, (16, 16)).save(source / "tiny.png")
    (source / "layers.psd").write_bytes(b"8BPS fake photoshop file")
    (source / "old").mkdir()
    painting(3, BLUE_GREEN, (200, 200)).save(source / "old" / "inside.png")
    frames = [painting(i, BLUE_GREEN, (200, 200)).convert("P") for i in range(2)]
    frames[0].save(source / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("CMYK", (200, 200), (0, 200, 200, 0)).save(source / "cmyk.jpg")
    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (200, 1))
    Image.fromarray(ramp).save(source / "sixteen_bit.png")
    palette = Image.new("P", (200, 200), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 100, 200))
    palette.save(source / "palette_transparent.png", transparency=0)
    painting(4, BLUE_GREEN, (256, 256)).save(source / "utf16.png")
    (source / "utf16.txt").write_bytes("a café at dusk".encode("utf-16"))
    painting(5, BLUE_GREEN, (256, 256)).save(source / "ansi.png")
    (source / "ansi.txt").write_bytes("a naïve sketch – blue".encode("cp1252"))
    return source


EXPECTED_SKIPS = {
    "truncated.png": "truncated",
    "empty.jpg": "0 bytes",
    "notes.jpg": "not an image",
    "bomb.png": "too large",
    "tiny.png": "too small",
    "layers.psd": "not an image type",
    "old": "sub-folder",
}


def test_bad_inputs_are_named_and_skipped_and_the_source_is_untouched(tmp_path):
    source = bad_source_folder(tmp_path)
    before = folder_fingerprint(source)
    dest = tmp_path / "out"
    result = prepare_dataset(source, dest, PrepareOptions(size=128))

    assert folder_fingerprint(source) == before
    reasons = {problem.path.name: problem.reason for problem in result.skipped}
    assert set(reasons) == set(EXPECTED_SKIPS)
    for name, words in EXPECTED_SKIPS.items():
        assert words in reasons[name], (name, reasons[name])
    stems = sorted(p.name.split("-", 2)[2] for p in result.written)
    expected = ["animated", "ansi", "cmyk", "good", "palette_transparent", "sixteen_bit", "utf16"]
    assert stems == [f"{stem}.png" for stem in expected]
    for path in result.written:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (128, 128)
    by_stem = {p.name.split("-", 2)[2]: p for p in result.written}
    assert by_stem["utf16.png"].with_suffix(".txt").read_text(encoding="utf-8") == "a café at dusk"
    assert by_stem["ansi.png"].with_suffix(".txt").read_text(encoding="utf-8") == "a naïve sketch – blue"
    # The 16-bit ramp keeps its tones instead of clipping to white; transparency becomes white, not black.
    ramp = np.asarray(Image.open(by_stem["sixteen_bit.png"]).convert("L"), dtype=int)
    assert ramp[:, 5].mean() < 40 and ramp[:, -5].mean() > 215
    assert np.asarray(Image.open(by_stem["palette_transparent.png"]))[64, 5].tolist() == [255, 255, 255]


def test_cli_names_every_skipped_file(tmp_path):
    source = bad_source_folder(tmp_path)
    before = folder_fingerprint(source)
    dest = tmp_path / "out"
    command = [sys.executable, "-m", "ti_trainer", "preprocess", str(source), str(dest), "--size", "128"]
    done = subprocess.run(
        command + ["--crop", "focal", "--flip", "horizontal"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    for name in EXPECTED_SKIPS:
        assert f"skipped {name}:" in done.stdout
    assert "12 of 12 source images processed, 14 images written, 7 files skipped" in done.stdout
    assert folder_fingerprint(source) == before
    assert len(outputs(dest)) == 14


def test_existing_caption_actions(tmp_path):
    source = source_with(tmp_path, {"a.png": (128, 128)})
    (source / "a.txt").write_bytes(b"old words\n")
    expected = {
        "ignore": "new words",
        "keep": "old words",
        "prepend": "old words new words",
        "append": "new words old words",
    }
    for action, caption in expected.items():
        options = PrepareOptions(size=64, existing_caption=action)
        written = prepare_dataset(
            source, tmp_path / action, options, captioner=lambda image: "new words"
        ).written
        assert written[0].with_suffix(".txt").read_text(encoding="utf-8") == caption, action
    # Without a captioner, "ignore" drops the old caption: training falls back to the file name, as in A1111.
    written = prepare_dataset(
        source, tmp_path / "none", PrepareOptions(size=64, existing_caption="ignore")
    ).written
    assert not written[0].with_suffix(".txt").exists()


def test_a_captioner_failure_flags_that_image_and_goes_on(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for index in range(3):
        painting(index, BLUE_GREEN, (96, 96)).save(source / f"{index}.png")

    def flaky(image):
        if flaky.calls == 1:
            flaky.calls += 1
            raise RuntimeError("out of memory")
        flaky.calls += 1
        return "a field"

    flaky.calls = 0
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=64), captioner=flaky)
    assert len(result.written) == 3
    assert [p.path.name for p in result.flagged] == ["1.png"] and "out of memory" in result.flagged[0].reason
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in result.written] == [
        "a field",
        "",
        "a field",
    ]


def test_progress_and_interrupt(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for index in range(5):
        painting(index, BLUE_GREEN, (96, 96)).save(source / f"{index}.png")
    calls = []
    result = prepare_dataset(
        source,
        tmp_path / "out",
        PrepareOptions(size=64),
        progress=lambda done, total, name: calls.append((done, total, name)),
        should_stop=lambda: len(calls) >= 2,
    )
    assert result.interrupted and result.sources_done == 2 and len(result.written) == 2
    assert calls == [(0, 5, "0.png"), (1, 5, "1.png"), (2, 5, "")]
    assert result.summary().startswith("Interrupted: 2 of 5")


def test_destination_rules(tmp_path):
    source = source_with(tmp_path, {"a.png": (96, 96)})
    with pytest.raises(UserError, match="never overwritten"):
        prepare_dataset(source, source, PrepareOptions(size=64))
    with pytest.raises(UserError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out", PrepareOptions(size=64))
    with pytest.raises(UserError, match="multiple of 8"):
        prepare_dataset(source, tmp_path / "out", PrepareOptions(size=100))
    # A destination inside the source (the seed's "processed" folder) is fine and never listed as skipped.
    first = prepare_dataset(source, source / "processed", PrepareOptions(size=64))
    second = prepare_dataset(source, source / "processed", PrepareOptions(size=64))
    assert first.skipped == [] and second.skipped == [] and len(second.written) == 1


def test_leftovers_from_an_earlier_run_are_pointed_out(tmp_path):
    source = source_with(tmp_path, {"a.png": (96, 96)})
    dest = tmp_path / "out"
    prepare_dataset(source, dest, PrepareOptions(size=64, flips=("horizontal",)))
    result = prepare_dataset(source, dest, PrepareOptions(size=64))
    assert any("already held 1 other files" in note for note in result.notes)
    assert (dest / "00000-1-a.png").exists()  # never deleted: it may be the artist's


# --- crops at the edge of enlarged images; one failing image never aborts the folder ----------------------


def test_the_crop_box_never_passes_the_edge_of_an_enlarged_image():
    from ti_trainer.prepare.geometry import cover_and_crop

    # The reported case: 230x303 prepared to 512 with the focal point at the bottom edge. Rounding the
    # scaled height (674.5 -> 675) put the box 0.2 px below the source, and Pillow refused it.
    crop = cover_and_crop(Image.new("RGB", (230, 303)), (512, 512), (0.5, 1.0))
    assert crop.size == (512, 512)
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = (int(rng.integers(64, 700)), int(rng.integers(64, 700)))
        target = tuple(int(side) for side in rng.choice([384, 512, 576, 640, 768], size=2))
        focus = tuple(float(rng.choice([0.0, 1.0, rng.random()])) for _ in range(2))
        assert cover_and_crop(Image.new("RGB", size), target, focus).size == target, (size, target, focus)


def test_focal_crop_of_small_images_with_the_focal_point_at_the_edge(tmp_path, monkeypatch):
    from ti_trainer.prepare import preprocess
    from ti_trainer.prepare.focal import FocalPoint

    sizes = {f"{index:02d}.png": (230 + index, 303 - index) for index in range(6)}
    source = source_with(tmp_path, sizes)
    monkeypatch.setattr(preprocess, "find_focal_point", lambda image, weights: FocalPoint(0.5, 1.0))
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=512, crop="focal"))
    assert result.skipped == []
    assert len(result.written) == len(sizes)
    assert all(Image.open(path).size == (512, 512) for path in result.written)


def test_an_image_that_fails_is_named_and_the_rest_is_written(tmp_path, monkeypatch):
    from ti_trainer.prepare import preprocess

    source = source_with(tmp_path, {"a.png": (96, 96), "b-breaks.png": (97, 96), "c.png": (96, 96)})
    real = preprocess.cover_and_crop

    def breaks_on_b(image, target, focus=(0.5, 0.5)):
        if image.width == 97:
            raise ValueError("box can't exceed original image size")
        return real(image, target, focus)

    monkeypatch.setattr(preprocess, "cover_and_crop", breaks_on_b)
    result = prepare_dataset(source, tmp_path / "out", PrepareOptions(size=64))
    assert [path.name for path in result.written] == ["00000-0-a.png", "00002-0-c.png"]
    [problem] = result.skipped
    assert problem.path.name == "b-breaks.png"
    assert "ValueError" in problem.reason and "exceed original image size" in problem.reason
    assert "skipped b-breaks.png: could not be prepared" in "\n".join(result.lines())
