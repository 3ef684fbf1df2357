"""After a short run on the tiny model: the comparison grid, the CLI verbs, "use this step", the panel's handlers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_analysis_validation import make_config

from ti_trainer.analysis import compare
from ti_trainer.analysis.image_report import report_for_step
from ti_trainer.analysis.run_files import COMPARE_SETTINGS_JSON, RunInfo
from ti_trainer.analysis.use_step import use_step
from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.cli import main as cli_main
from ti_trainer.cli.terminal import train_in_terminal
from ti_trainer.embeddings.files import load_embedding, optimizer_state_path
from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.ui import results_panel

NAME = "testemb"


@pytest.fixture(scope="module")
def backend():
    return tiny_backend("v")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, backend) -> Path:
    """A 4-step run through the CLI's training path (the monitors come from the config), copies at 2 and 4."""
    root = tmp_path_factory.mktemp("results")
    config = make_config(root, backend, max_steps=4)
    return train_in_terminal(config, lambda: backend).log_folder


def solid(request) -> Image.Image:
    """A stand-in for txt2img: a plain image of the requested size, its colour set by the step's vectors."""
    shade = int(abs(float(next(iter(request.vectors.values())).sum())) * 1000) % 256
    return Image.new("RGB", (request.width, request.height), (shade, 128, 255 - shade))


def services_for(run_dir: Path, **overrides) -> HostServices:
    root = run_dir.parents[2]
    settings = dict(
        name="standalone",
        embeddings_dir=root / "embeddings",
        templates_dirs=[],
        log_dir=root / "logs",
        models_dir=root / "models",
        get_backend=lambda: pytest.fail("the backend is not needed here"),
    )
    settings.update(overrides)
    return HostServices(**settings)


def test_the_run_leaves_what_the_analysis_reads(trained):
    run = RunInfo.open(trained)
    assert list(run.saved_steps()) == [2, 4]
    assert run.validation_loss().steps == [0, 2, 4]
    assert run.norms()[0] == [0, 1, 2, 4]
    assert run.image_report()[0] == 4
    assert "norm_range" in run.summary()


def test_images_measured_later_match_the_ones_measured_while_training(trained, backend):
    run = RunInfo.open(trained)
    during = {row["image"]: row for row in run.image_report(4)[1]}
    later = report_for_step(run, backend, 4)
    assert [row.image for row in later] == sorted(during)
    for row in later:
        assert row.loss == pytest.approx(float(during[row.image]["loss"]), rel=1e-4)
        assert row.gradient_share == pytest.approx(float(during[row.image]["gradient_share"]), rel=1e-3)


def test_grid_has_a_row_per_step_a_column_per_prompt_and_labels(trained):
    run = RunInfo.open(trained)
    settings = compare.CompareSettings(
        prompts=["a city, [name]", "a cat, [name]", "a plain landscape"], seeds=[1, 2], width=96, height=64
    )
    progress = []
    grid = compare.render_grid(run, settings, solid, on_progress=lambda d, t: progress.append((d, t)))

    assert grid.steps == [2, 4] and grid.row_labels == ["step 2", "step 4"]
    assert grid.column_labels[:2] == [f"a city, {NAME} (seed 1)", f"a city, {NAME} (seed 2)"]
    assert len(grid.column_labels) == 6 and progress[-1] == (12, 12)
    assert grid.cell_size == (96, 64)
    with Image.open(grid.path) as saved:
        width, height = saved.size
        info = json.loads(saved.text["ti_trainer_compare"])
    assert (width - 96 * 6) > 0 and (height - 64 * 2) > 0, "room for the step and prompt labels"
    assert (width - 96 * 6) < 120 and (height - 64 * 2) < 100
    assert info["rows"] == grid.row_labels and info["columns"] == grid.column_labels
    assert grid.path.parent == run.root / "compare"
    assert len(list(grid.cells_folder.glob("*.png"))) == 12
    # Rows differ by the embedding only: the two steps' cells are different, the seeds' cells are not here.
    cell = grid.image.getpixel((width - 48, height - 32)), grid.image.getpixel((width - 48, height - 96))
    assert cell[0] != cell[1]
    assert any("a plain landscape" in note for note in grid.notes), "a prompt without [name] is pointed out"
    assert compare.load_settings(run).prompts == settings.prompts, "the prompts are kept for this run"


def test_grid_refuses_what_it_cannot_do(trained):
    run = RunInfo.open(trained)
    with pytest.raises(UserError, match="No saved copy"):
        compare.render_grid(run, compare.CompareSettings(), solid, steps=[3])
    with pytest.raises(UserError, match="at least one prompt"):
        compare.render_grid(run, compare.CompareSettings(prompts=["  "]), solid)
    assert compare.parse_steps("", [2, 4]) == [2, 4]
    assert compare.parse_steps("1-3", [2, 4]) == [2]
    with pytest.raises(UserError, match="Saved steps: 2, 4"):
        compare.parse_steps("5", [2, 4])


def test_compare_cli_after_training_writes_the_grid_and_prints_its_path(trained, capsys):
    code = cli_main.main(
        [
            "compare",
            str(trained),
            "--sampler-steps",
            "2",
            "--prompt",
            "a city, [name]",
            "--prompt",
            "a cat, [name]",
            "--steps",
            "2, 4",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    path = Path(out[-1])
    assert path.is_file() and path.parent == trained / "compare" and path.suffix == ".png"
    with Image.open(path) as grid:
        assert grid.size[0] > 2 * 64 and grid.size[1] > 2 * 64
        assert json.loads(grid.text["ti_trainer_compare"])["rows"] == ["step 2", "step 4"]
    assert json.loads((trained / COMPARE_SETTINGS_JSON).read_text())["prompts"] == [
        "a city, [name]",
        "a cat, [name]",
    ]


def test_analyze_cli_prints_the_findings_and_writes_the_charts(trained, capsys):
    assert cli_main.main(["analyze", str(trained), "--window", "20"]) == 0
    out = capsys.readouterr().out
    assert "Run 'testemb': 2 saved step(s) (2, 4)." in out
    assert "Suggested step: none yet" in out
    assert "Images at step 4" in out
    for chart in ("loss_chart.png", "norm_chart.png"):
        with Image.open(trained / chart) as image:
            assert image.size[0] >= 700


def test_cli_reports_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli_main.main(["compare", str(tmp_path)]) == 2
    assert "not a training run's log folder" in capsys.readouterr().err


def test_use_step_puts_the_copy_in_the_embeddings_folder(trained, tmp_path):
    run = RunInfo.open(trained)
    refreshed = []
    path = use_step(run, 2, "my-style", tmp_path, refresh=lambda: refreshed.append(True))

    assert path == tmp_path / "my-style.pt" and refreshed == [True]
    embedding = load_embedding(path)
    assert embedding.name == "my-style" and embedding.step == 2
    assert embedding.vectors.equal(load_embedding(run.saved_steps()[2]).vectors)
    assert optimizer_state_path(path).is_file(), "training 'my-style' again resumes from step 2"
    assert not list(tmp_path.glob(".*.tmp")), "written through a temporary file"

    with pytest.raises(UserError, match="already exists"):
        use_step(run, 4, "my-style", tmp_path)
    use_step(run, 4, "my-style", tmp_path, overwrite=True)
    assert load_embedding(path).step == 4
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(UserError):
            use_step(run, 2, bad, tmp_path)
    with pytest.raises(UserError, match="Saved steps: 2, 4"):
        use_step(run, 3, "other", tmp_path)


def test_panel_shows_a_run(trained):
    services = services_for(trained)
    labels = results_panel.run_labels(str(services.log_dir))
    assert labels == [trained.relative_to(services.log_dir).as_posix()]
    view = results_panel.RunView(*results_panel.show_run(str(services.log_dir), labels[0]))

    assert "2 saved step(s)" in view.summary
    assert view.loss_chart.size[1] > view.norm_chart.size[1] > 200
    assert len(view.table["data"]) == 4 and view.table["headers"] == results_panel.TABLE_HEADERS
    assert view.steps == {"__type__": "update", "choices": ["2", "4"], "value": ["2", "4"]}
    assert view.use_step["value"] == "4" and view.new_name == f"{NAME}-4"
    assert view.prompts.splitlines()[0] == "a city, [name]"  # this run's saved prompts (an earlier test)


def test_panel_handlers_render_use_and_refuse(trained, tmp_path, backend):
    # The host renders (render_preview); its model is asked only for its family, to check the copies.
    model = SimpleNamespace(family=backend.family)
    services = services_for(trained, render_preview=solid, embeddings_dir=tmp_path, get_backend=lambda: model)
    log_dir, label = str(services.log_dir), results_panel.run_labels(str(services.log_dir))[0]

    image, message = results_panel.render_comparison(
        services, log_dir, label, ["4"], "a city, [name]\na cat, [name]", "", "1", 64, 64, 2, 7.0
    )
    assert image.size[1] < 64 * 2 and "Saved" in message and "1 steps x 2 columns" in message

    message = results_panel.use_selected_step(services, log_dir, label, "2", "picked", False)
    assert "picked" in message and (tmp_path / "picked.pt").is_file()
    assert "already exists" in results_panel.use_selected_step(services, log_dir, label, "2", "picked", False)

    assert "not a run inside" in results_panel.show_run(log_dir, "../..")[0]
    assert results_panel.suggest_name(label, "2", f"{NAME}-4") == f"{NAME}-2"
    assert results_panel.suggest_name(label, "2", "my own name") == "my own name"


def test_panel_builds_with_gradio(trained):
    gr = pytest.importorskip("gradio")
    with gr.Blocks():
        results_panel.build_results_panel(services_for(trained))


def test_chart_axes_cover_every_value_and_an_empty_chart_says_so():
    from ti_trainer.analysis import charts

    for low, high in [(0.5, 0.5041), (0.08, 0.83), (0.25, 0.25), (-3.0, 7.0)]:
        ticks = charts.nice_ticks(low, high)
        assert ticks[0] <= low and ticks[-1] >= high and len(ticks) <= 8
    empty = charts.render(charts.Chart("Validation loss", "loss", [charts.Series("fixed batch", [], [])]))
    assert empty.size == (760, 320) and len(set(empty.getdata())) > 1, "the 'no data' text is drawn"


# Runs a verb as `python -m ti_trainer` does, then names the heavy libraries it loaded on the way.
LOADED_LIBRARIES = """
import runpy, sys
sys.argv = ["ti_trainer", *sys.argv[1:]]
try:
    runpy.run_module("ti_trainer", run_name="__main__")
except SystemExit as done:
    status = done.code
heavy = ("diffusers", "transformers", "gradio", "matplotlib")
print("LOADED", ",".join(name for name in heavy if name in sys.modules))
sys.exit(status)
"""


@pytest.mark.parametrize("verb", ["--help", "report", "analyze", "use-step"])
def test_cli_verbs_that_need_no_model_load_no_model_library(verb, trained, dataset, tmp_path):
    """`--help`, `report`, `analyze` and `use-step` answer in seconds: diffusers and transformers (and
    Gradio, matplotlib) stay unloaded."""
    args = {
        "--help": ["--help"],
        "report": ["report", str(dataset)],
        "analyze": ["analyze", str(trained)],
        "use-step": ["use-step", str(trained), "2", "startup-copy", "--embeddings-dir", str(tmp_path)],
    }[verb]
    done = subprocess.run(
        [sys.executable, "-c", LOADED_LIBRARIES, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LOADED", done.stdout


def edge_ink(image: Image.Image, margin: int = 3) -> list[tuple[int, int]]:
    """Pixels other than the background within `margin` of the image's edge: text cut off there."""
    width, height = image.size
    pixels = image.load()
    return [
        (x, y)
        for x in range(width)
        for y in range(height)
        if (x < margin or y < margin or x >= width - margin or y >= height - margin)
        and pixels[x, y] != (255, 255, 255)
    ]


def edge_cases() -> list:
    """Charts whose texts crowd the edges: long titles, markers at the last step, many series, small sizes."""
    from ti_trainer.analysis import charts

    steps = list(range(0, 3001, 50))
    many = [
        charts.Series(f"vector {i}", steps, [0.3 + 0.01 * i] * len(steps), charts.PALETTE[i])
        for i in range(6)
    ]
    norm_like = charts.Chart(
        "Vector lengths: far above the band, the embedding overpowers prompts (overbaking)",
        "length",
        many,
        (0.2, 0.5, "ordinary words"),
        [charts.Marker(3000, "vector 0 leaves the band", (214, 39, 40)), charts.Marker(0, "suggested 0")],
    )
    loss_like = charts.Chart(
        "Training loss: new images, noise and timesteps every step, so it is noisy",
        "loss",
        [charts.Series("each step", steps, [0.1 + (s % 7) / 100 for s in steps])],
        markers=[charts.Marker(2990, "suggested 2990")],
    )
    return [
        (chart, size) for chart in (norm_like, loss_like) for size in [(760, 320), (480, 260), (360, 240)]
    ]


def test_chart_texts_lie_inside_the_image(trained):
    """Titles, legends, tick labels, "step" and marker labels are measured and placed inside the image."""
    from ti_trainer.analysis import charts, results

    for chart, size in edge_cases():
        image, texts = charts.render_with_layout(chart, size)
        for text in texts:
            left, top, right, bottom = text.box
            assert left >= 0 and top >= 0 and right <= size[0] and bottom <= size[1], (
                chart.title,
                size,
                text,
            )
        shown = " ".join(text.text for text in texts)
        assert "step" in shown and ("overpowers" in shown or "noisy" in shown)
        assert not edge_ink(image), (chart.title, size)
    analysis = results.analyse(RunInfo.open(trained))
    for image in (results.loss_chart(analysis), results.norm_chart(analysis)):
        assert not edge_ink(image)


def test_the_per_image_report_computes_in_the_precision_the_run_trained_in(
    trained, backend, tmp_path, monkeypatch
):
    """A model held in fp16 (the WebUI's) trains in fp16 on "auto" precision; the report measured later must
    compute in it too, not in the device's own "auto" choice (bf16 on a bf16 GPU; fp32 on this CPU)."""
    copy = shutil.copytree(trained, tmp_path / trained.name)  # the report rewrites the run's CSV
    monkeypatch.setattr(backend, "preferred_precision", "fp16")
    dtypes = []
    real_predict = backend.predict

    def predict(*args, **kwargs):
        out = real_predict(*args, **kwargs)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(backend, "predict", predict)
    report_for_step(RunInfo.open(copy), backend, 4)
    assert dtypes and set(dtypes) == {torch.float16}


def test_compare_needs_the_model_named_for_a_run_on_a_real_checkpoint(trained, tmp_path, capsys):
    """Without --model, compare renders with the built-in tiny model the run names; a run on another model
    gets told to name it, before any rendering (a tiny model would only fail on the vectors' width)."""
    run = shutil.copytree(trained, tmp_path / "run")
    for settings in run.glob("settings-*.json"):
        recorded = json.loads(settings.read_text())
        assert recorded["model_name"].startswith("tiny-")
        settings.write_text(json.dumps({**recorded, "model_name": "animeXL_v3"}))
    grids_before = sorted((run / "compare").glob("*.png"))
    assert cli_main.main(["compare", str(run), "--steps", "2", "--prompt", "a cat, [name]"]) == 2
    err = capsys.readouterr().err
    assert "This run was trained on animeXL_v3. Give that model with --model" in err
    assert sorted((run / "compare").glob("*.png")) == grids_before
