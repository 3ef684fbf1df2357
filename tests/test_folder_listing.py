"""Special entries in a dataset folder (symlink loops, broken links, named pipes, device files) are named and
skipped the same way by every verb that lists a folder: preprocess, report, the caption tools and lint, the
training loader and the planner's image count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_prepare_drawing import BLUE_GREEN, folder_fingerprint, painting

from ti_trainer.errors import UserError
from ti_trainer.fsutil import scan_folder
from ti_trainer.images import load_folder
from ti_trainer.prepare.captions import caption_listing
from ti_trainer.prepare.lint import lint_dataset
from ti_trainer.prepare.preprocess import PrepareOptions, prepare_dataset
from ti_trainer.prepare.report import build_report
from ti_trainer.prepare.report_format import lint_text, report_text
from ti_trainer.training.batch_plan import count_images
from ti_trainer.ui import prepare_panel as panel

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not hasattr(os, "mkfifo"), reason="named pipes and symlinks need a POSIX system"
)

# File name -> a word its reason must contain. Image suffixes on purpose: each looks like an image by name.
SPECIAL = {
    "loop.png": "loops",
    "ping.png": "loops",  # ping.png -> pong.png -> ping.png
    "pong.png": "loops",
    "dangling.png": "broken",
    "fifo.png": "pipe",
    "null.png": "device",
}


def folder_with_special_entries(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(2):
        painting(index, BLUE_GREEN, (96, 96)).save(folder / f"good{index}.png")
    (folder / "good0.txt").write_text("a lake", encoding="utf-8")
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("pong.png", folder / "ping.png")
    os.symlink("ping.png", folder / "pong.png")
    os.symlink("missing.png", folder / "dangling.png")
    os.mkfifo(folder / "fifo.png")
    os.symlink(os.devnull, folder / "null.png")  # a character device reached through a link
    return folder


def assert_named(reasons: dict[str, str]) -> None:
    for name, word in SPECIAL.items():
        assert name in reasons, (name, reasons)
        assert word in reasons[name], (name, reasons[name])


def test_the_one_listing_classifies_every_special_entry(tmp_path):
    folder = folder_with_special_entries(tmp_path)
    scan = scan_folder(folder, "dataset folder")
    assert [path.name for path in scan.files] == ["good0.png", "good0.txt", "good1.png"]
    assert_named({entry.path.name: entry.reason for entry in scan.skipped})
    assert "missing.png" in next(e.reason for e in scan.skipped if e.path.name == "dangling.png")


def test_preprocess_skips_special_entries_by_name_and_writes_the_rest(tmp_path):
    folder = folder_with_special_entries(tmp_path)
    dest = folder / "prepared"  # inside the source: found and left out without resolving paths
    dest.mkdir()
    result = prepare_dataset(folder, dest, PrepareOptions(size=64))
    assert_named({problem.path.name: problem.reason for problem in result.skipped})
    assert "prepared" not in {problem.path.name for problem in result.skipped}
    assert sorted(path.name for path in result.written) == ["00000-0-good0.png", "00001-0-good1.png"]


def test_cli_preprocess_on_a_folder_with_a_symlink_loop(tmp_path):
    folder = folder_with_special_entries(tmp_path)
    before = folder_fingerprint(folder)
    dest = tmp_path / "out"
    command = [sys.executable, "-m", "ti_trainer", "preprocess", str(folder), str(dest), "--size", "64"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for name in SPECIAL:
        assert f"skipped {name}:" in done.stdout
    assert len(list(dest.glob("*.png"))) == 2
    assert folder_fingerprint(folder) == before


def test_report_names_special_entries(tmp_path):
    report = build_report(folder_with_special_entries(tmp_path))
    assert report.count == 2
    assert_named(dict(report.skipped))
    text = report_text(report)
    assert all(f"skipped {name}:" in text for name in SPECIAL)


def test_caption_tools_and_lint_name_special_entries(tmp_path):
    listing = caption_listing(folder_with_special_entries(tmp_path))
    assert [entry.image.name for entry in listing.entries] == ["good0.png", "good1.png"]
    assert_named({problem.path.name: problem.reason for problem in listing.skipped})
    text = lint_text(lint_dataset(listing.entries, skipped=listing.skipped, check_duplicates=False))
    assert all(f"skipped {name}:" in text for name in SPECIAL)


def test_caption_panel_names_special_entries(tmp_path):
    folder = folder_with_special_entries(tmp_path)
    names, _, status, *_ = panel.load_caption_page(str(folder), 1)
    assert names == ["good0.png", "good1.png"]
    assert all(name in status for name in SPECIAL)


def test_training_loader_names_special_entries(tmp_path):
    loaded = load_folder(folder_with_special_entries(tmp_path))
    assert [image.path.name for image in loaded.images] == ["good0.png", "good1.png"]
    assert_named({problem.path.name: problem.reason for problem in loaded.skipped})


def test_training_loader_without_images_names_what_it_passed_over(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    os.symlink("loop.png", folder / "loop.png")
    os.mkfifo(folder / "fifo.png")
    with pytest.raises(UserError, match="holds no image files") as caught:
        load_folder(folder)
    assert "skipped loop.png: a symbolic link that loops" in str(caught.value)
    assert "skipped fifo.png: a named pipe" in str(caught.value)


def test_planner_counts_what_the_loader_loads(tmp_path):
    assert count_images(folder_with_special_entries(tmp_path)) == 2


def test_a_looping_folder_is_a_clear_error(tmp_path):
    os.symlink("itself", tmp_path / "itself")
    with pytest.raises(UserError, match="symbolic link that loops"):
        scan_folder(tmp_path / "itself", "dataset folder")


def test_a_looping_destination_is_a_clear_error(tmp_path):
    folder = folder_with_special_entries(tmp_path)
    os.symlink("out", tmp_path / "out")
    with pytest.raises(UserError, match="symbolic link that leads nowhere"):
        prepare_dataset(folder, tmp_path / "out", PrepareOptions(size=64))
