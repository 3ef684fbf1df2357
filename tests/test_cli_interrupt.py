"""Ctrl+C on the CLI: the first stops the run at the next step boundary and saves; the second leaves at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ti_trainer.cli import main as cli
from ti_trainer.cli import terminal
from ti_trainer.embeddings.files import load_embedding

MAX_STEPS = 100000  # never reached: the run must end by the interrupt


def start_training(tmp_path: Path, dataset: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    assert subprocess.run(
        [sys.executable, "-m", "ti_trainer", "create", "stopme", "--embeddings-dir", "emb"],
        cwd=tmp_path, env=env, capture_output=True, timeout=300,
    ).returncode == 0  # fmt: skip
    return subprocess.Popen(
        [
            sys.executable, "-m", "ti_trainer", "train", "stopme", "--data", str(dataset), "--embeddings-dir",
            "emb", "--log-dir", "logs", "--width", "64", "--height", "64", "--batch", "2", "--steps",
            str(MAX_STEPS), "--save-every", "1", "--preview-every", "0", "--validate-every", "0", "--seed", "1",
        ],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_first_copy(tmp_path: Path, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(tmp_path.glob("logs/*/stopme/embeddings/stopme-1.pt")):
        if process.poll() is not None:
            pytest.fail(f"training ended before it was interrupted: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("training did not save its first step in time")
        time.sleep(0.05)


def test_first_ctrl_c_stops_at_a_step_boundary_and_saves(tmp_path, dataset):
    process = start_training(tmp_path, dataset)
    wait_for_first_copy(tmp_path, process)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the first Ctrl+C did not stop the run")

    assert process.returncode == 0, err
    assert "Stopping after this step and saving" in err and "Traceback" not in err
    assert "Training interrupted at" in out
    steps_done = int(out.split("Training interrupted at ")[1].split(" steps")[0])
    assert 1 <= steps_done < MAX_STEPS
    saved = load_embedding(tmp_path / "emb" / "stopme.pt")
    assert saved.step == steps_done  # the embedding holds the last whole step
    copies = sorted(
        int(p.stem.rsplit("-", 1)[1]) for p in tmp_path.glob("logs/*/stopme/embeddings/stopme-*.pt")
    )
    assert copies == list(range(1, steps_done + 1))


def test_second_ctrl_c_aborts_at_once(monkeypatch, capsys):
    # Deterministic in-process: the handler itself, with real signals, then what main makes of the abort.
    with terminal.StopOnInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested, "the first Ctrl+C must ask the run to stop"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the run

    def aborted(config, get_backend):
        raise KeyboardInterrupt

    monkeypatch.setattr(terminal, "train_in_terminal", aborted)
    monkeypatch.setattr("ti_trainer.backends.loading.load_backend", lambda *args: None)
    assert cli.main(["train", "x", "--data", "nowhere", "--steps", "2"]) == cli.EXIT_ABORTED
    err = capsys.readouterr().err
    assert "Aborted" in err and "Traceback" not in err
