"""The dataset report: counts and sizes, batch plans, colours, the planted outlier, near-duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image
from test_prepare_drawing import BLUE_GREEN, ORANGE, busy_branches, painting

from ti_trainer.prepare.batches import batch_plans, nearby_counts
from ti_trainer.prepare.colours import colour_name, dominant_colours, thumbnail_pixels
from ti_trainer.prepare.report import build_report
from ti_trainer.prepare.report_format import report_html, report_text

REPO = Path(__file__).resolve().parents[1]


def calm_set(folder: Path, count: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        painting(index, BLUE_GREEN).save(folder / f"{index:02d}-landscape.png")
    return folder


def test_a_planted_orange_image_is_flagged_for_colour(tmp_path):
    folder = calm_set(tmp_path / "data")
    painting(99, ORANGE).save(folder / "05-creamsicle.png")
    report = build_report(folder)
    assert [outlier.name for outlier in report.outliers] == ["05-creamsicle.png"]
    assert report.outliers[0].kinds == ["colour"]
    assert any("yellow / orange" in reason for reason in report.outliers[0].reasons)
    assert "05-creamsicle.png" in report_text(report) and "05-creamsicle.png" in report_html(report)


def test_a_planted_busy_image_is_flagged_for_composition(tmp_path):
    folder = calm_set(tmp_path / "data")
    busy_branches(3, BLUE_GREEN).save(folder / "03-branches.png")
    report = build_report(folder)
    assert [outlier.name for outlier in report.outliers] == ["03-branches.png"]
    assert "composition" in report.outliers[0].kinds
    assert any("busier" in reason for reason in report.outliers[0].reasons)


def test_an_image_with_its_masses_elsewhere_is_flagged_for_layout(tmp_path):
    folder = calm_set(tmp_path / "data")
    split = painting(3, BLUE_GREEN)
    # Night over snow: a black top half over a white bottom half, where every other image is evenly lit.
    split.paste((10, 15, 20), (0, 0, 160, 80))
    split.paste((235, 240, 240), (0, 80, 160, 160))
    split.save(folder / "03-night-sky.png")
    report = build_report(folder)
    assert [outlier.name for outlier in report.outliers] == ["03-night-sky.png"]
    assert any("light and dark masses" in reason for reason in report.outliers[0].reasons)


def test_a_consistent_set_has_no_outliers_and_small_sets_are_not_judged(tmp_path):
    assert build_report(calm_set(tmp_path / "calm")).outliers == []
    small = calm_set(tmp_path / "small", count=3)
    painting(99, ORANGE).save(small / "orange.png")
    report = build_report(small)
    assert report.outliers == [] and any("too little" in note for note in report.notes)


def test_counts_sizes_skipped_and_near_duplicates(tmp_path):
    folder = calm_set(tmp_path / "data", count=5)
    painting(50, BLUE_GREEN, (300, 200)).save(folder / "wide.png")
    original = Image.open(folder / "00-landscape.png")
    original.resize((120, 120), Image.LANCZOS).save(folder / "00-copy.jpg", quality=85)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "00-landscape.txt").write_text("a lake", encoding="utf-8")
    report = build_report(folder, size=180)
    assert report.count == 7
    assert report.sizes == {"160x160": 5, "300x200": 1, "120x120": 1}
    assert report.smaller_than_size == [
        "00-copy.jpg",
        "00-landscape.png",
        "01-landscape.png",
        "02-landscape.png",
        "03-landscape.png",
        "04-landscape.png",
    ]
    assert [name for name, _ in report.skipped] == ["broken.png"]
    assert report.near_duplicates == [["00-copy.jpg", "00-landscape.png"]]
    assert len(report.images) == 7 and all(len(image.colours) >= 1 for image in report.images)
    assert report.palette and abs(sum(swatch.share for swatch in report.palette) - 1) < 1e-6


def test_batch_plans_follow_the_seed_arithmetic():
    plans = {plan.batch: plan for plan in batch_plans(33, max_batch=8)}
    assert sorted(plans) == [1, 3]
    assert plans[3].accumulations == [1, 11] and plans[3].steps_per_epoch == [11, 1]
    assert [plan.batch for plan in batch_plans(17)] == [1]
    assert nearby_counts(17) == [(16, [2, 4, 8]), (18, [2, 3, 6])]
    assert nearby_counts(33) == []


def test_dominant_colours_and_names():
    image = Image.new("RGB", (40, 40), (220, 30, 30))
    image.paste((30, 60, 220), (0, 0, 40, 10))
    swatches = dominant_colours(thumbnail_pixels(image), count=3)
    assert [swatch.name for swatch in swatches[:2]] == ["red", "blue"]
    assert abs(swatches[0].share - 0.75) < 0.02 and abs(swatches[1].share - 0.25) < 0.02
    assert colour_name((250, 150, 60)) == "orange" and colour_name((128, 128, 128)) == "grey"
    assert colour_name((90, 60, 20)) == "brown"


def test_cli_report_json_names_the_outlier(tmp_path):
    folder = calm_set(tmp_path / "data")
    painting(99, ORANGE).save(folder / "05-creamsicle.png")
    (folder / "05-creamsicle.txt").write_text("an oil painting of a sunset", encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "ti_trainer",
        "report",
        str(folder),
        "--json",
        "--init-text",
        "oil painting",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["report"]["count"] == 9
    assert [outlier["name"] for outlier in data["report"]["outliers"]] == ["05-creamsicle.png"]
    lint = {(finding["image"], finding["kind"]) for finding in data["lint"]["findings"]}
    assert ("05-creamsicle.png", "init-words") in lint
