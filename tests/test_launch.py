"""The launcher wires a run once, for every caller; its one progress record tells the whole run."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from types import SimpleNamespace

import pytest

from ti_trainer.errors import UserError
from ti_trainer.launch import launch
from ti_trainer.progress import LiveRun, RunProgress

# What the API's progress route has always returned: clients read these names.
API_FIELDS = {
    "id",
    "status",
    "step",
    "end_step",
    "epoch",
    "loss",
    "learn_rate",
    "error",
    "embedding_path",
    "log_folder",
    "last_saved",
    "last_preview",
    "messages",
}


def test_a_run_fills_the_record_and_tells_every_listener(make_config, backend):
    config = make_config(max_steps=4, preview_every=2, validate_every=2)
    live, heard, seen, refreshed_while = LiveRun(), [], [], []

    result = launch(
        config,
        lambda: backend,
        live,
        message_sinks=[heard.append],
        on_progress=seen.append,
        refresh_embeddings=lambda: refreshed_while.append(live.snapshot().status),
    )

    # The host reloads the saved embedding before anyone reading the record hears that the run ended.
    assert refreshed_while == ["running"]
    run = live.snapshot()
    assert run.status == "finished" and run.phase == "finished" and run.done
    assert (run.step, run.first_step, run.end_step) == (4, 0, 4)
    assert [progress.step for progress in seen] == [1, 2, 3, 4]
    assert [step for step, _ in run.losses] == [1, 2, 3, 4] and run.loss == run.losses[-1][1]
    with open(result.log_folder / "validation_loss.csv", newline="", encoding="utf-8") as file:
        rows = [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(file)]
    assert [step for step, _ in run.validation] == [step for step, _ in rows] == [0, 2, 4]
    assert [loss for _, loss in run.validation] == pytest.approx([loss for _, loss in rows], rel=1e-6)
    assert [name.rsplit("/", 1)[-1] for name in run.previews] == ["testemb-2.png", "testemb-4.png"]
    assert run.last_preview == run.previews[-1]
    assert run.last_saved == str(result.embedding_path) == run.embedding_path
    assert run.log_folder == str(result.log_folder)
    assert heard and set(heard) <= set(run.messages) and run.messages[-1] == result.summary
    # The run's own settings, so a page opened later shows the form it was started with.
    assert run.settings == config.to_dict()


def test_a_stop_request_is_recorded_and_the_run_saves(make_config, backend):
    live = LiveRun()
    result = launch(
        make_config(max_steps=50), lambda: backend, live, should_stop=lambda: live.snapshot().step >= 2
    )
    run = live.snapshot()
    assert result.interrupted and run.status == "interrupted" and run.stop_requested
    assert run.step == 2 and "interrupted at step 2" in run.summary


def test_a_failure_is_recorded_and_raised(make_config, backend):
    live = LiveRun("job-1")
    config = make_config(template="no-such-template.txt")
    with pytest.raises(UserError, match="no-such-template.txt") as raised:
        launch(config, lambda: backend, live)
    run = live.snapshot()
    assert run.status == "failed" and run.error == str(raised.value) and run.id == "job-1"

    def broken():
        raise RuntimeError("the model would not load")

    with pytest.raises(RuntimeError):
        launch(make_config(), broken, live)
    assert "RuntimeError: the model would not load" in live.snapshot().error


def report(step: int, loss: float, skipped: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        step=step, end_step=10, loss=loss, learn_rate=0.005, epoch=0, skipped=skipped, seconds=1.0
    )


def test_the_record_is_json_for_the_api_even_after_a_skipped_step():
    live = LiveRun("abc")
    live.queue()
    assert live.snapshot().phase == "queued"
    live.begin("x", 10)
    assert live.snapshot().phase == "preparing"
    live.on_step(report(1, 0.5))
    live.on_step(report(2, math.nan, skipped=True))
    live.validation_point(2, math.inf)
    run = live.snapshot()
    assert run.phase == "training" and run.loss == 0.5 and run.losses == [(1, 0.5)] and not run.validation
    data = json.loads(json.dumps(dataclasses.asdict(run), allow_nan=False))
    assert set(data) >= API_FIELDS and data["id"] == "abc" and data["status"] == "running"
    live.stopping()
    assert live.snapshot().phase == "stopping"


def test_a_snapshot_is_a_copy_the_writer_does_not_change():
    live = LiveRun()
    live.begin("x", 10)
    before = live.snapshot()
    live.on_step(report(1, 0.5))
    live.message("hello")
    assert before.losses == [] and before.messages == [] and before.version < live.snapshot().version
    assert isinstance(before, RunProgress)
