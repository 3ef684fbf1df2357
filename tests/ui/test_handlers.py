"""The panels' handlers driven as the page drives them, without a browser: create, train, follow, interrupt."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_events import events

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.progress import LiveRun
from ti_trainer.ui import create_panel, train_handlers
from ti_trainer.ui.live_run import format_duration, progress_html
from ti_trainer.ui.train_form import config_from_form, form_fields, form_values, initial_config
from ti_trainer.ui.train_panel import build_train_panel


def recorded(services):
    """Record what the job tells the host's progress machinery, and each embeddings refresh."""
    calls = {"progress": [], "refreshes": 0}
    services.job_progress = lambda done, total, text: calls["progress"].append((done, total, text))

    def refresh():
        calls["refreshes"] += 1

    services.refresh_embeddings = refresh
    return calls


def test_name_status_says_free_taken_or_wrong(services):
    assert "ti-trainer-ok" in create_panel.name_status(services, "my-style")
    assert "ti-trainer-error" in create_panel.name_status(services, "../escape")
    create_panel.create_embedding_job(services, "my-style", "painting", 2, False)
    taken = create_panel.name_status(services, "my-style")
    assert "ti-trainer-warn" in taken and "my-style.pt" in taken


def test_init_text_counts_tokens_with_the_backend_and_shows_the_prompt_budget(services):
    chunker = services.get_backend().prompt_encoder.chunker
    text = "oil painting, richly textured"
    tokens, _ = chunker.token_count(text)
    status = create_panel.init_text_status(services, text, 2)
    assert f"{tokens} tokens for 2 vectors" in status
    assert "only 2 of them are used" in status  # A1111 strides through the tokens (§1.4)
    assert "takes 2 of the 75 tokens" in status and "73 are left" in status
    assert "start at zero" in create_panel.init_text_status(services, "", 4)
    assert f"{tokens} tokens for {tokens + 3} vectors" in create_panel.init_text_status(
        services, text, tokens + 3
    )


def test_create_writes_the_file_refreshes_the_host_and_refuses_to_clobber(services):
    calls = recorded(services)
    result, status = create_panel.create_embedding_job(services, "classipeint", "oil painting", 3, False)
    path = services.embeddings_dir / "classipeint.pt"
    assert "ti-trainer-ok" in result and path.is_file()
    assert load_embedding(path).vectors.shape[0] == 3
    assert calls["refreshes"] == 1 and "ready" in status

    again, _ = create_panel.create_embedding_job(services, "classipeint", "oil painting", 5, False)
    assert "ti-trainer-error" in again and "already exists" in again
    assert load_embedding(path).vectors.shape[0] == 3
    replaced, _ = create_panel.create_embedding_job(services, "classipeint", "oil painting", 5, True)
    assert "ti-trainer-ok" in replaced and load_embedding(path).vectors.shape[0] == 5


def test_form_values_read_back_into_the_same_config(services):
    config = initial_config(services)
    config.embedding_name, config.batch_size, config.learn_rate = "x", 3, "0.005:100, 1e-3"
    config.seed = None
    names = form_fields()
    values = form_values(config, names)
    assert values[names.index("seed")] == -1  # the form's "random"
    values[names.index("batch_size")] = 3.0  # a Number component hands back floats
    assert config_from_form(services, names, values) == config


def test_train_creates_files_reports_progress_and_refreshes(services, train_values):
    calls = recorded(services)
    create_panel.create_embedding_job(services, "shapes", "painting", 2, False)
    names, values = train_values("shapes")
    live = LiveRun()

    result, extra = services.wrap_job(train_handlers.run_training_job)(
        services, live, names, "task(1)", *values
    )

    assert "ti-trainer-ok" in result and "finished at 4 steps" in result and extra == ""
    embedding = load_embedding(services.embeddings_dir / "shapes.pt")
    assert embedding.step == 4
    run_folder = next(services.log_dir.glob("*/shapes"))
    assert sorted(p.name for p in (run_folder / "embeddings").glob("*.pt")) == ["shapes-2.pt", "shapes-4.pt"]
    assert sorted(p.name for p in (run_folder / "images").glob("*.png")) == ["shapes-2.png", "shapes-4.png"]
    assert next(run_folder.glob("settings-*.json")).is_file()

    # What the host's progress bar and the panel were told.
    assert [(done, total) for done, total, _ in calls["progress"]] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert calls["refreshes"] >= 1
    run = live.snapshot()
    assert run.status == "finished" and [step for step, _ in run.losses] == [1, 2, 3, 4]
    assert [Path(p).name for p in run.previews] == ["shapes-2.png", "shapes-4.png"]
    assert run.last_saved == str(services.embeddings_dir / "shapes.pt")
    assert run.validation and run.validation[0][0] == 0  # validation loss before the first step

    progress, plot, gallery, saved, version = train_handlers.poll(live, None)
    assert 'data-state="finished"' in progress and "Step 4 / 4" in progress
    assert list(plot["value"]["curve"].unique()) == ["training loss", "validation loss"]
    assert [caption for _, caption in gallery["value"]] == ["shapes-4", "shapes-2"]  # newest first
    assert saved["value"].endswith("shapes.pt") and saved["visible"]
    unchanged = train_handlers.poll(live, version)
    assert unchanged[1] == gr.update()  # nothing heavy re-sent when nothing changed

    status = train_handlers.embedding_status(services, "shapes", 10)
    assert "Trained 4 steps" in status and "optimizer state" in status
    assert "raise Max steps" in train_handlers.embedding_status(services, "shapes", 4)
    dropdown, _ = train_handlers.refresh_lists(services, "shapes", "filewords_name.txt")
    assert "shapes" in dropdown["choices"] and dropdown["value"] == "shapes"


def test_interrupt_stops_at_a_step_boundary_and_saves(services, train_values):
    create_panel.create_embedding_job(services, "stopme", "painting", 1, False)
    names, values = train_values("stopme", max_steps=500, save_every=0, preview_every=0, validate_every=0)
    live = LiveRun()
    job = services.wrap_job(train_handlers.run_training_job)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(result=job(services, live, names, "", *values)))
    worker.start()
    deadline = time.monotonic() + 60
    while live.snapshot().step < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 'data-state="stopping"' in train_handlers.request_interrupt(services, live)
    worker.join(timeout=60)

    assert not worker.is_alive()
    run = live.snapshot()
    assert run.status == "interrupted" and "interrupted" in outcome["result"][0]
    assert 2 <= run.step < 500
    assert load_embedding(services.embeddings_dir / "stopme.pt").step == run.step
    assert not services.interrupt_requested()  # the next job starts with a clear flag


def test_bad_input_is_a_message_not_a_crash_and_shown_once(services, train_values):
    create_panel.create_embedding_job(services, "nodata", "painting", 1, False)
    names, values = train_values("nodata", data_dir=str(services.embeddings_dir / "missing"))
    live = LiveRun()
    result, extra = train_handlers.run_training_job(services, live, names, "", *values)
    assert live.snapshot().status == "failed"
    progress = progress_html(live.snapshot())
    assert 'data-state="failed"' in progress and "does not exist" in progress
    # Once on the page: the progress box (which every page sees) says it; the result does not repeat it.
    page = progress + result + extra
    assert page.count("does not exist") == 1


def test_a_form_that_cannot_be_read_is_answered_once_and_leaves_the_run_on_show(services, train_values):
    live = LiveRun()
    create_panel.create_embedding_job(services, "shown", "painting", 1, False)
    names, values = train_values("shown", validate_every=0, preview_every=0, max_steps=1)
    train_handlers.run_training_job(services, live, names, "", *values)
    before = live.snapshot()
    values[names.index("batch_size")] = "lots"
    result, extra = train_handlers.run_training_job(services, live, names, "", *values)
    assert "ti-trainer-error" in result and "not a number" in result
    page = progress_html(live.snapshot()) + result + extra
    assert page.count("not a number") == 1
    assert live.snapshot().status == before.status == "finished"


def test_a_fresh_page_lists_what_is_there_now(services, train_values):
    """The tab is built when the host starts; embeddings made since are listed as soon as a page opens."""
    with gr.Blocks():
        panel = build_train_panel(services)
    create_panel.create_embedding_job(services, "made-later", "painting", 1, False)
    (services.templates_dirs[0] / "later.txt").write_text("[name], [filewords]\n", encoding="utf-8")
    names = list(panel.form)
    opened = dict(zip([*names, "status"], panel.page_load.fn(None, "style_filewords.txt", 100)))
    assert "made-later" in opened["embedding_name"]["choices"]
    assert "later.txt" in opened["template"]["choices"]
    assert opened["template"]["value"] == "style_filewords.txt"
    # No run since the host started: the form keeps its values.
    assert opened["batch_size"] == gr.update()


def test_a_fresh_page_shows_the_last_run_with_its_own_form(services, train_values):
    live = LiveRun()
    create_panel.create_embedding_job(services, "lastrun", "painting", 1, False)
    names, values = train_values(
        "lastrun", batch_size=3, learn_rate="0.02", validate_every=0, preview_every=0
    )
    train_handlers.run_training_job(services, live, names, "", *values)
    with gr.Blocks():
        panel = build_train_panel(services, live)
    form_names = list(panel.form)
    outputs = panel.page_load.fn(None, "style_filewords.txt", 3000)
    opened = dict(zip([*form_names, "status", "progress"], outputs))
    assert 'data-state="finished"' in opened["progress"]
    assert opened["embedding_name"]["value"] == "lastrun" and opened["batch_size"] == 3
    assert opened["learn_rate"] == "0.02" and opened["max_steps"] == 4
    assert opened["template"]["value"] == "filewords_name.txt"
    assert "Already trained 4 steps" in opened["status"]
    # The outputs line up with the components the tab wires them to.
    assert len(outputs) == len(panel.page_load.outputs)


def test_the_tab_refreshes_both_lists_when_a_page_opens(services):
    from ti_trainer.ui.tab import build_tab

    tab = build_tab(services)
    loads = [event for event in events(tab) if any(trigger == "load" for _, trigger in event.triggers)]
    refreshed = {output.elem_id for event in loads for output in event.outputs}
    assert {"ti_trainer_train_embedding_name", "ti_trainer_progress", "ti_trainer_results_run"} <= refreshed


def test_last_run_settings_fill_the_form(services, train_values):
    create_panel.create_embedding_job(services, "again", "painting", 1, False)
    names, values = train_values("again", batch_size=3, learn_rate="0.02", validate_every=0, preview_every=0)
    train_handlers.run_training_job(services, LiveRun(), names, "", *values)

    filled = train_handlers.fill_from_last_run(services, names, "again", str(services.log_dir))
    assert "Settings read from" in filled[-1]
    restored = dict(zip(names, filled[:-1]))
    assert restored["batch_size"] == 3 and restored["learn_rate"] == "0.02" and restored["seed"] == 3
    missing = train_handlers.fill_from_last_run(services, names, "never-trained", str(services.log_dir))
    assert "No earlier run" in missing[-1] and missing[0] == gr.update()


def test_planner_view_follows_the_dataset_folder(services, dataset):
    html, splits = train_handlers.plan_view(str(dataset), 3, 1, 100, 50, 0, 4)
    assert "4 images" in html and "1 of 4 images sit out" in html
    assert splits["visible"] and splits["samples"][0] == [4, 1, 1]
    assert all(4 % (b * a) == 0 for b, a, _ in splits["samples"])
    empty_html, empty = train_handlers.plan_view(str(dataset / "nothing"), 1, 1, 100, 50, 0, 4)
    assert "is not a folder" in empty_html and not empty["visible"]
    assert train_handlers.use_combination(1, [[4, 1, 1], [2, 2, 1]]) == (2, 2)
    # 4 images, batch 2: two steps per epoch; 103 steps -> 104, every 5 -> 6 (nearest), previews off stay off.
    assert train_handlers.align_to_epochs(str(dataset), 2, 1, 103, 7, 0) == (104, 8, 0)


def test_learn_rate_schedule_is_checked_as_typed():
    assert train_handlers.learn_rate_status("0.005", 100) == ""
    assert "0.005 until step 10" in train_handlers.learn_rate_status("0.005:10, 1e-3", 100)
    assert "ti-trainer-error" in train_handlers.learn_rate_status("fast", 100)


def test_progress_estimates_time_left_from_wall_time():
    clock = iter([100.0, 104.0, 108.0])
    live = LiveRun(clock=lambda: next(clock))
    live.begin("x", end_step=10)

    class Report:
        def __init__(self, step):
            self.step, self.end_step, self.epoch, self.loss = step, 10, 0, 0.5
            self.learn_rate, self.skipped, self.seconds = 0.005, False, 1.0

    live.on_step(Report(1))
    assert live.snapshot().eta_seconds == pytest.approx(9.0)  # from the first step's own time
    live.on_step(Report(2))
    live.on_step(Report(3))
    assert live.snapshot().seconds_per_step == pytest.approx(4.0)  # saves and previews count too
    assert "ETA 0:28" in progress_html(live.snapshot())
    assert format_duration(3725) == "1:02:05" and format_duration(None) == "—"


def test_a_resumed_run_reports_progress_from_where_it_started(services, train_values):
    calls = recorded(services)
    create_panel.create_embedding_job(services, "resume", "painting", 1, False)
    names, values = train_values("resume", max_steps=2, validate_every=0, preview_every=0)
    train_handlers.run_training_job(services, LiveRun(), names, "", *values)
    calls["progress"].clear()
    names, values = train_values("resume", max_steps=4, validate_every=0, preview_every=0)
    live = LiveRun()
    train_handlers.run_training_job(services, live, names, "", *values)
    assert [(done, total) for done, total, _ in calls["progress"]] == [(1, 2), (2, 2)]
    assert live.snapshot().first_step == 2 and "Step 4 / 4" in progress_html(live.snapshot())


def test_training_changes_the_vectors(services, train_values):
    create_panel.create_embedding_job(services, "moves", "painting", 1, False)
    before = load_embedding(services.embeddings_dir / "moves.pt").vectors
    names, values = train_values("moves", validate_every=0, preview_every=0)
    train_handlers.run_training_job(services, LiveRun(), names, "", *values)
    assert not torch.equal(before, load_embedding(services.embeddings_dir / "moves.pt").vectors)
    assert isinstance(
        TrainConfig.from_settings_file(next(services.log_dir.glob("*/moves/settings-*.json"))), TrainConfig
    )


def test_a_fresh_page_lists_the_runs_finished_since_the_tab_was_built(services, train_values):
    from ti_trainer.ui.results_panel import RunView, build_results_panel

    with gr.Blocks():
        page_load = build_results_panel(services)
    create_panel.create_embedding_job(services, "later", "painting", 1, False)
    names, values = train_values("later", validate_every=0, preview_every=0, max_steps=2)
    train_handlers.run_training_job(services, LiveRun(), names, "", *values)

    runs, *view = page_load.fn(str(services.log_dir), None)
    assert len(runs["choices"]) == 1 and runs["value"].endswith("/later")
    shown = RunView(*view)
    assert shown.loss_chart is not None and shown.steps["choices"] == ["2"]
    assert len(page_load.outputs) == 1 + len(view)


def test_the_panel_counts_epochs_as_the_loss_csv_does(services, train_values):
    """A1111's meaning (epoch = (step - 1) // steps per epoch, from 0): the CSV, the CLI and the panel agree."""
    import csv

    create_panel.create_embedding_job(services, "epochs", "painting", 1, False)
    # 4 images, batch 2: two steps per epoch, so step 3 is the first step of epoch 1.
    names, values = train_values("epochs", validate_every=0, preview_every=0, save_every=0, max_steps=3)
    live = LiveRun()
    train_handlers.run_training_job(services, live, names, "", *values)
    csv_file = next(services.log_dir.glob("*/epochs/textual_inversion_loss.csv"))
    rows = list(csv.DictReader(csv_file.open(encoding="utf-8")))
    assert [(row["step"], row["epoch"]) for row in rows] == [("1", "0"), ("2", "0"), ("3", "1")]
    run = live.snapshot()
    assert run.step == 3 and f"epoch {rows[-1]['epoch']}" in progress_html(run)
