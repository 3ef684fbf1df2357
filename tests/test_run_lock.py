"""One run at a time per embedding: a second run is refused before any work, naming the first; a lock left
by a run that died is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ti_trainer.errors import UserError
from ti_trainer.training.loop import TrainingHooks, train
from ti_trainer.training.run_lock import embedding_lock, lock_path


def no_step_allowed(report):
    raise AssertionError("the second run trained although the first holds the embedding")


def test_a_second_run_on_the_same_embedding_is_refused_while_the_first_runs(backend, make_config, tmp_path):
    first = make_config(max_steps=4)
    refusals: list[str] = []

    def start_a_second_run(report):
        if report.step != 2:
            return
        second = make_config(create=False, max_steps=8)
        with pytest.raises(UserError) as error:
            train(second, backend, TrainingHooks(on_step=no_step_allowed, on_message=lambda t: None))
        refusals.append(str(error.value))

    result = train(first, backend, TrainingHooks(on_step=start_a_second_run, on_message=lambda t: None))

    assert result.steps_done == 4 and len(refusals) == 1
    assert f"process {os.getpid()}" in refusals[0] and "started 20" in refusals[0]
    assert "testemb" in refusals[0]
    rows = (result.log_folder / "textual_inversion_loss.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4], "only the first run logged"
    assert not lock_path(result.embedding_path).exists(), "released when the run ends"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(embedding: Path, pid: int, host: str) -> Path:
    path = lock_path(embedding)
    path.write_text(
        json.dumps({"pid": pid, "host": host, "started": "2024-05-01T10:00:00"}), encoding="utf-8"
    )
    return path


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_message(backend, make_config, tmp_path):
    config = make_config(max_steps=2)
    pid = dead_pid()
    lock = write_lock(tmp_path / "embeddings" / "testemb.pt", pid, socket.gethostname())
    messages: list[str] = []

    result = train(config, backend, TrainingHooks(on_message=messages.append))

    assert result.steps_done == 2
    assert any("Taking over" in m and str(pid) in m for m in messages)
    assert not lock.exists()


def test_a_lock_from_another_host_is_left_to_the_user(backend, make_config, tmp_path):
    config = make_config(max_steps=2)
    lock = write_lock(tmp_path / "embeddings" / "testemb.pt", dead_pid(), "another-machine")
    with pytest.raises(UserError, match="on another-machine, started 2024-05-01") as error:
        train(config, backend, TrainingHooks(on_step=no_step_allowed, on_message=lambda t: None))
    assert f"delete {lock}" in str(error.value)
    assert lock.exists(), "not ours to remove"


def test_the_lock_is_released_when_the_run_fails(backend, make_config, tmp_path):
    config = make_config(max_steps=4)

    def fail(report):
        raise UserError("something went wrong mid-run")

    with pytest.raises(UserError, match="mid-run"):
        train(config, backend, TrainingHooks(on_step=fail, on_message=lambda t: None))
    assert not lock_path(tmp_path / "embeddings" / "testemb.pt").exists()


def test_the_lock_is_created_once_and_says_who_holds_it(tmp_path):
    embedding = tmp_path / "emb.pt"
    with embedding_lock(embedding) as path:
        holder = json.loads(path.read_text(encoding="utf-8"))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"process {os.getpid()}"), embedding_lock(embedding):
            pass
        assert path.exists(), "the refused attempt left the holder's lock alone"
    assert not path.exists()
