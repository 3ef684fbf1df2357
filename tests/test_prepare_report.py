"""The dataset report: counts and sizes, batch plans, colours, the planted outlier, near-duplicates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_prepare_drawing import BLUE_GREEN, ORANGE, busy_branches, painting

from ti_trainer.prepare.batches import batch_plans, nearby_counts
from ti_trainer.prepare.colours import colour_name, dominant_colours, thumbnail_pixels
from ti_trainer.prepare.phash import NEAR_DUPLICATE_BITS, near_duplicate_groups
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


# --- the near-duplicate search at scale -------------------------------------------------------------------


def reference_groups(hashes: dict[str, int], max_bits: int) -> list[list[str]]:
    """Every pair compared, groups joined by a plain search: what the indexed search must reproduce."""
    names = sorted(hashes)
    linked = {name: {name} for name in names}
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            if (hashes[first] ^ hashes[second]).bit_count() <= max_bits:
                linked[first].add(second)
                linked[second].add(first)
    groups, seen = [], set()
    for name in names:
        if name in seen:
            continue
        group, frontier = set(), [name]
        while frontier:
            current = frontier.pop()
            if current not in group:
                group.add(current)
                frontier += linked[current] - group
        seen |= group
        if len(group) > 1:
            groups.append(sorted(group))
    return groups


def hashes_with_planted_copies(count: int, copies: int, seed: int) -> tuple[dict[str, int], dict[str, str]]:
    """`count` random 64-bit hashes, plus `copies` near-copies of some of them (0 to 14 bits flipped),
    some copies of copies: chains that join into one group. Returns the hashes and copy -> original."""
    rng = np.random.default_rng(seed)
    hashes = {f"img{index:05d}": int(value) for index, value in enumerate(rng.integers(0, 2**63, count))}
    originals = {}
    for index in range(copies):
        original = str(rng.choice(sorted(hashes)))
        flipped = rng.choice(64, size=int(rng.integers(0, 15)), replace=False)
        name = f"copy{index:04d}"
        hashes[name] = hashes[original] ^ sum(1 << int(bit) for bit in flipped)
        originals[name] = original
    return hashes, originals


@pytest.mark.parametrize("max_bits", [0, 3, 10, 12, 16, 24])
def test_indexed_near_duplicate_search_matches_comparing_every_pair(max_bits):
    hashes, _ = hashes_with_planted_copies(400, 120, seed=max_bits)
    assert near_duplicate_groups(hashes, max_bits) == reference_groups(hashes, max_bits)


def test_ten_thousand_hashes_find_every_planted_near_duplicate():
    hashes, originals = hashes_with_planted_copies(10_000, 300, seed=7)
    steps = []
    groups = near_duplicate_groups(hashes, progress=lambda done, total, what: steps.append((done, total)))
    group_of = {name: index for index, group in enumerate(groups) for name in group}
    for copy, original in originals.items():
        if (hashes[copy] ^ hashes[original]).bit_count() <= NEAR_DUPLICATE_BITS:
            assert group_of.get(copy) is not None and group_of[copy] == group_of.get(original), copy
    for group in groups:  # nothing joined without reason: each member is near another one
        for name in group:
            assert any(
                (hashes[name] ^ hashes[other]).bit_count() <= NEAR_DUPLICATE_BITS
                for other in group
                if other != name
            ), (name, group)
    assert steps and steps[-1][0] == steps[-1][1]  # the search reported its progress up to the end
    assert [done for done, _ in steps] == sorted(done for done, _ in steps)


def test_report_progress_covers_the_duplicate_search(tmp_path):
    folder = calm_set(tmp_path / "data", count=5)
    calls = []
    build_report(folder, progress=lambda done, total, what: calls.append((done, total, what)))
    assert calls[0] == (0, 5, "00-landscape.png")
    assert any(what == "comparing image hashes" for _, _, what in calls)


def test_cli_report_shows_progress_on_stderr(tmp_path):
    folder = calm_set(tmp_path / "data", count=5)
    command = [sys.executable, "-m", "ti_trainer", "report", str(folder), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)  # the bar stays off stdout
    assert "04-landscape.png" in done.stderr and "comparing image hashes" in done.stderr
