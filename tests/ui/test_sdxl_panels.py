"""The artist's workflow on SDXL from the panels: Create, Train, the Results panel's comparison grid and "use this
step", and a resumed run, on the standalone host over the built-in tiny SDXL, driven as the page drives them.

One embedding is created and trained once for the module (`trained`); the tests read what that left and go on
from it. tests/ui/test_handlers.py and test_panels.py do the same on the tiny SD model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image, ImageChops
from test_handlers import recorded
from test_panels import Page, values_of

from ti_trainer.analysis.compare import GRID_MARGIN
from ti_trainer.analysis.run_files import NORMS_CSV
from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.embeddings.files import load_embedding, optimizer_state_path
from ti_trainer.progress import LiveRun
from ti_trainer.ui import create_panel, results_panel, train_handlers
from ti_trainer.ui.tab import build_tab

NAME = "xlstyle"
ENCODERS = ("clip_l", "clip_g")


def widths(services) -> dict[str, int]:
    return {spec.key: spec.width for spec in services.get_backend().family.text_encoders}


@pytest.fixture(scope="module")
def trained(xl_services, xl_train_values):
    """NAME created (2 vectors) and trained 4 steps from the panels: copies, previews and validation at 2, 4."""
    services = xl_services
    calls = recorded(services)
    created = create_panel.create_embedding_job(services, NAME, "oil painting", 2, False)
    initial = load_embedding(services.embeddings_dir / f"{NAME}.safetensors").vectors
    names, values = xl_train_values(NAME)
    live = LiveRun()
    result = services.wrap_job(train_handlers.run_training_job)(services, live, names, "task(1)", *values)
    (folder,) = services.log_dir.glob(f"*/{NAME}")
    return SimpleNamespace(
        created=created, initial=initial, result=result, live=live, calls=calls, folder=folder, names=names
    )


def test_create_counts_the_init_text_per_encoder_and_writes_both_tensors(xl_services):
    services, backend = xl_services, xl_services.get_backend()
    text = "oil painting, richly textured"
    ids = backend.tokenize([text])[0]  # CLIP-L's and bigG's tokenizers: the same BPE, so the same tokens
    status = create_panel.init_text_status(services, text, 3)
    assert f"{len(ids)} tokens for 3 vectors" in status
    assert f"Tokens per text encoder: clip_l {len(ids)}, clip_g {len(ids)}." in status
    assert "start at zero" in create_panel.init_text_status(services, "", 3)
    assert "Tokens per text encoder" not in create_panel.init_text_status(services, "", 3)

    assert "ti-trainer-ok" in create_panel.name_status(services, "xlcreate")
    result, name_info = create_panel.create_embedding_job(services, "xlcreate", text, 3, False)
    path = services.embeddings_dir / "xlcreate.safetensors"  # SDXL's format, not .pt
    assert "ti-trainer-ok" in result and path.name in result and "ready" in name_info
    created = load_embedding(path)
    assert set(created.vectors) == set(ENCODERS)
    for key, width in widths(services).items():
        assert created.vectors[key].shape == (3, width), key
        # A1111's rule on each encoder's own token embeddings: vector i copies token floor(i * tokens / 3).
        table = backend.token_embedding_weight(key)
        expected = torch.stack([table[ids[i * len(ids) // 3]] for i in range(3)])
        torch.testing.assert_close(created.vectors[key], expected.float(), rtol=0, atol=0)
    taken = create_panel.name_status(services, "xlcreate")
    assert "ti-trainer-warn" in taken and "xlcreate.safetensors" in taken
    status = train_handlers.embedding_status(services, "xlcreate", 10)
    assert f"3 vector(s) of width {sum(widths(services).values())}" in status and "Not trained yet" in status


def test_train_reports_progress_previews_and_leaves_the_log_folder(xl_services, trained):
    services = xl_services
    assert "ti-trainer-ok" in trained.created[0]
    assert "finished at 4 steps" in trained.result[0] and str(trained.folder) in trained.result[0]
    assert [(done, total) for done, total, _ in trained.calls["progress"]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert trained.calls["refreshes"] >= 2  # after Create, and when the run saved

    final = load_embedding(services.embeddings_dir / f"{NAME}.safetensors")
    assert final.step == 4
    for key in ENCODERS:
        assert not torch.allclose(final.vectors[key], trained.initial[key]), f"{key} did not learn"

    copies = sorted(p.name for p in (trained.folder / "embeddings").glob("*.safetensors"))
    assert copies == [f"{NAME}-2.safetensors", f"{NAME}-4.safetensors"]
    previews = sorted((trained.folder / "images").glob("*.png"))
    assert [p.name for p in previews] == [f"{NAME}-2.png", f"{NAME}-4.png"]
    assert all(Image.open(p).size == (64, 64) for p in previews)  # the training size
    # The preview that carries the embedding holds both tensors of its step.
    carried = load_embedding(trained.folder / "image_embeddings" / f"{NAME}-4.png").vectors
    for key in ENCODERS:
        torch.testing.assert_close(carried[key], final.vectors[key])

    run = trained.live.snapshot()
    assert run.status == "finished" and [step for step, _ in run.losses] == [1, 2, 3, 4]
    assert [Path(p).name for p in run.previews] == [f"{NAME}-2.png", f"{NAME}-4.png"]
    assert [step for step, _ in run.validation] == [0, 2, 4]
    assert any("Saving as .safetensors" in text for text in run.messages)
    progress, _, gallery, saved, _ = train_handlers.poll(trained.live, None)
    assert "Step 4 / 4" in progress and saved["value"].endswith(f"{NAME}.safetensors")
    assert [caption for _, caption in gallery["value"]] == [f"{NAME}-4", f"{NAME}-2"]

    with (trained.folder / NORMS_CSV).open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == ["step", *(f"{key}_vector_{i}" for key in ENCODERS for i in range(2))]
    for key in ENCODERS:
        for i in range(2):
            assert float(rows[-1][f"{key}_vector_{i}"]) == pytest.approx(
                float(final.vectors[key][i].norm()), rel=1e-5
            )
    assert "Trained 4 steps" in train_handlers.embedding_status(services, NAME, 10)


def test_the_results_panel_shows_the_run_with_each_encoders_norms(xl_services, trained):
    services = xl_services
    (label,) = [run for run in results_panel.run_labels(str(services.log_dir)) if run.endswith(f"/{NAME}")]
    view = results_panel.RunView(*results_panel.show_run(str(services.log_dir), label))
    assert "2 saved step(s) (2, 4)" in view.summary
    assert all(f"No {key} vector grew far past" in view.summary for key in ENCODERS)
    assert view.steps["choices"] == ["2", "4"] and view.new_name == f"{NAME}-4"
    assert (view.width, view.height) == (64, 64)
    assert isinstance(view.norm_chart, Image.Image) and len(view.table["data"]) == 4
    # Which image dominates, measured again at a saved step with the model.
    table, table_note = results_panel.measure_images(services, str(services.log_dir), label, "2")
    assert "At step 2" in table_note and len(table["data"]) == 4
    assert sum(row[3] for row in table["data"]) == pytest.approx(100, abs=0.2)


def time_ids_of_each_unet_call(backend) -> tuple[list, object]:
    """Record the size and crop conditioning (`time_ids`) of every UNet call; returns (records, hook handle)."""
    seen: list[list[float]] = []

    def record(module, args, kwargs):
        for row in kwargs["added_cond_kwargs"]["time_ids"].tolist():
            seen.append(row)

    return seen, backend.unet.register_forward_pre_hook(record, with_kwargs=True)


def test_the_comparison_grid_and_use_step_through_the_results_panel(xl_services, trained):
    """Through the page's wiring: Refresh, pick steps and prompts, render the grid (2 steps x 2 prompts at 128x64,
    SDXL's size conditioning of that size), then put step 2 into the embeddings folder under a new name."""
    services, backend = xl_services, xl_services.get_backend()
    page = Page(build_tab(services))
    page.fire(page.find("results", "🔄 Refresh", gr.Button))
    run = page.find("results", "Run (date/name)", gr.Dropdown)
    label = next(choice for choice in values_of(page.choices[run._id]) if choice.endswith(f"/{NAME}"))
    page.set(run, label)
    page.fire(run, "change")

    width, height, prompts = 128, 64, ["a cat, [name]", "a house, [name]"]
    page.set(page.find("results", "Steps (rows of the grid)"), ["4", "2"])
    page.set(
        page.find("results", "Prompts (columns), one per line; [name] is where the embedding goes"),
        "\n".join(prompts),
    )
    page.set(page.find("results", "Seeds (each adds a column per prompt)"), "5")
    page.set(page.find("results", "Width"), width)
    page.set(page.find("results", "Height"), height)
    page.set(page.find("results", "Sampling steps"), 2)
    render = page.find("results", "Render comparison grid", gr.Button)
    sizes, hook = time_ids_of_each_unet_call(backend)
    try:
        page.fire(render)
    finally:
        hook.remove()

    grid_image, message = (page.value(block) for block in page.outputs_of(render))
    assert "ti-trainer-ok" in message and "(2 steps x 2 columns)" in message
    (saved,) = (trained.folder / "compare").glob(f"{NAME}-compare-*.png")
    with Image.open(saved) as grid:
        info = json.loads(grid.text["ti_trainer_compare"])
        assert grid.size == grid_image.size
    assert info["rows"] == ["step 2", "step 4"] and info["steps"] == [2, 4]
    assert info["columns"] == [f"a cat, {NAME}", f"a house, {NAME}"]
    (cells,) = (trained.folder / "compare").glob(f"{NAME}-2*/")
    cell = {p.name: Image.open(p).convert("RGB") for p in cells.glob("*.png")}
    assert sorted(cell) == [f"step{s}-prompt{p}-seed5.png" for s in (2, 4) for p in (1, 2)]
    assert all(image.size == (width, height) for image in cell.values())
    # The grid is 2 rows of cells over 2 columns at the requested size, under the prompts and right of the steps.
    grid_w, grid_h = grid_image.size
    right, bottom = grid_w - GRID_MARGIN // 2, grid_h
    for row, step in enumerate((2, 4)):
        for column in range(2):
            x, y = right - (2 - column) * width, bottom - (2 - row) * height
            pasted = grid_image.convert("RGB").crop((x, y, x + width, y + height))
            expected = cell[f"step{step}-prompt{column + 1}-seed5.png"]
            assert not ImageChops.difference(pasted, expected).getbbox(), (step, column)
    assert right - 2 * width > 0 and bottom - 2 * height > 0, "room for the step and prompt labels"

    # Every UNet call of the grid had SDXL's size conditioning of the requested size, as the WebUI generates:
    # original = target = (height, width), crop (0, 0); 4 cells x 2 sampling steps x (prompt, negative).
    assert len(sizes) == 4 * 2 * 2
    assert all(row == [height, width, 0, 0, height, width] for row in sizes), sizes[:2]
    # Each row is its step's copy: the step-4 cell renders again from the step-4 file's vectors alone.
    step_4 = load_embedding(trained.folder / "embeddings" / f"{NAME}-4.safetensors").vectors
    again = backend.render(
        PreviewRequest(
            prompt=f"a cat, {NAME}",
            negative_prompt="",
            steps=2,
            cfg_scale=7.0,
            seed=5,
            width=width,
            height=height,
            sampler="Euler a",
            vectors={NAME: step_4},
        )
    )
    assert not ImageChops.difference(again.convert("RGB"), cell["step4-prompt1-seed5.png"]).getbbox()
    assert ImageChops.difference(cell["step2-prompt1-seed5.png"], cell["step4-prompt1-seed5.png"]).getbbox()

    # Use this step: step 2 under a new name, with both tensors, its step and its optimizer state.
    refreshes = trained.calls["refreshes"]
    page.set(page.find("results", "Step", gr.Dropdown), "2")
    page.fire(page.find("results", "Step", gr.Dropdown), "change")
    assert page.value(page.find("results", "Name to write in prompts")) == f"{NAME}-2"
    page.fire(page.find("results", "Put this step in the embeddings folder", gr.Button))
    installed = services.embeddings_dir / f"{NAME}-2.safetensors"
    copy = load_embedding(installed)
    step_2 = load_embedding(trained.folder / "embeddings" / f"{NAME}-2.safetensors")
    assert copy.step == 2 and copy.name == f"{NAME}-2"
    for key in ENCODERS:
        assert torch.equal(copy.vectors[key], step_2.vectors[key]), key
        assert not torch.equal(copy.vectors[key], step_4[key]), "the chosen step, not the last"
    assert optimizer_state_path(installed).is_file()
    assert trained.calls["refreshes"] == refreshes + 1
    dropdown, _ = train_handlers.refresh_lists(services, f"{NAME}-2", "filewords_name.txt")
    assert f"{NAME}-2" in dropdown["choices"]
    assert "with its optimizer state" in train_handlers.embedding_status(services, f"{NAME}-2", 4)


def test_a_run_resumes_from_the_used_step_and_ends_where_the_run_went(xl_services, xl_train_values, trained):
    """Training the step-2 copy on to step 4 resumes with its optimizer state and ends bit-identical to the
    original run's step 4: a resumed SDXL run loses nothing."""
    services = xl_services
    label = trained.folder.relative_to(services.log_dir).as_posix()
    # As the grid test left it (and so when this test runs alone).
    results_panel.use_selected_step(services, str(services.log_dir), label, "2", f"{NAME}-2", True)
    calls = recorded(services)
    names, values = xl_train_values(f"{NAME}-2")
    live = LiveRun()
    result, _ = train_handlers.run_training_job(services, live, names, "", *values)
    assert "finished at 4 steps" in result
    run = live.snapshot()
    assert run.first_step == 2 and [step for step, _ in run.losses] == [3, 4]
    assert [(done, total) for done, total, _ in calls["progress"]] == [(1, 2), (2, 2)]
    assert any("Loaded optimizer state" in text for text in run.messages)
    resumed = load_embedding(services.embeddings_dir / f"{NAME}-2.safetensors")
    straight = load_embedding(trained.folder / "embeddings" / f"{NAME}-4.safetensors")
    assert resumed.step == 4
    for key in ENCODERS:
        assert torch.equal(resumed.vectors[key], straight.vectors[key]), key
