"""The CLI as a user runs it: separate processes, exit codes, messages, and the demo's log folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ti_trainer.embeddings.files import load_embedding
from ti_trainer.embeddings.png import extract_embedding_data
from ti_trainer.training.loop import TrainingHooks, train


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # One thread, like this test process (conftest): bit-equality across processes needs the same reduction order.
    env = {**os.environ, "PYTHONHASHSEED": "random", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ti_trainer", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_create_then_train_across_processes_matches_one_run(tmp_path, dataset, make_config, backend):
    common = ["--embeddings-dir", "emb", "--log-dir", "logs"]
    created = cli("create", "cliemb", "--init-text", "painting", "--vectors", "2", *common[:2], cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert "Created" in created.stdout

    train_args = [
        "train", "cliemb", "--data", str(dataset), *common, "--template", "filewords_name.txt", "--lr", "0.01",
        "--batch", "2", "--width", "64", "--height", "64", "--save-every", "2", "--preview-every", "0",
        "--seed", "7",
    ]  # fmt: skip
    first = cli(*train_args, "--steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = cli(*train_args, "--steps", "4", cwd=tmp_path)  # resumes from step 2 in a new process
    assert second.returncode == 0, second.stderr
    assert "Training finished at 4 steps" in second.stdout

    in_process = train(
        make_config(name="cliemb", max_steps=4), backend, TrainingHooks(on_message=lambda t: None)
    )
    expected = load_embedding(in_process.embedding_path).vectors
    got = load_embedding(tmp_path / "emb" / "cliemb.pt").vectors
    assert torch.equal(got, expected), "two processes (resume) must give what one uninterrupted run gives"


def test_errors_are_messages_not_tracebacks(tmp_path):
    result = cli("create", "a/b", cwd=tmp_path)
    assert result.returncode == 2
    assert "path separator" in result.stderr and "Traceback" not in result.stderr

    cli("create", "dup", "--embeddings-dir", "emb", cwd=tmp_path)
    again = cli("create", "dup", "--embeddings-dir", "emb", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr

    bad_lr = cli(
        "train", "dup", "--embeddings-dir", "emb", "--data", str(tmp_path), "--lr", "fast", cwd=tmp_path
    )
    assert bad_lr.returncode == 2 and "0.005:100, 1e-3:1000, 1e-5" in bad_lr.stderr


def test_demo_leaves_a_complete_log_folder(tmp_path):
    result = cli("demo", "--out", "demo", "--steps", "25", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Step 1:" not in result.stderr, (
        "a first step that merely reaches the ordinary words is no overbake"
    )
    runs = list((tmp_path / "demo" / "textual_inversion").glob("*/demo-style"))
    assert len(runs) == 1, "expected <log>/<date>/<name>"
    log = runs[0]
    assert f"Log folder: {log.relative_to(tmp_path)}" in result.stdout
    copies = sorted((log / "embeddings").glob("demo-style-*.pt"), key=lambda p: load_embedding(p).step)
    assert [load_embedding(p).step for p in copies] == [10, 20, 25]
    assert (log / "textual_inversion_loss.csv").read_text().count("\n") == 26
    assert list(log.glob("settings-*.json"))
    assert load_embedding(tmp_path / "demo" / "embeddings" / "demo-style.pt").step == 25
    assert (log / "images" / "demo-style-25.png").is_file()
    carried = extract_embedding_data(log / "image_embeddings" / "demo-style-25.png")
    assert carried is not None and carried["step"] == 25


def test_the_cli_counts_epochs_as_the_loss_csv_does(make_config, backend, capsys):
    """From 0, as A1111's CSV: 4 images at batch 2 are two steps per epoch, so step 3 is in epoch 1."""
    import csv

    from ti_trainer.cli.terminal import train_in_terminal

    result = train_in_terminal(make_config(max_steps=3, save_every=0), lambda: backend)
    shown = capsys.readouterr().err
    with (result.log_folder / "textual_inversion_loss.csv").open(encoding="utf-8") as handle:
        epochs = [row["epoch"] for row in csv.DictReader(handle)]
    assert epochs == ["0", "0", "1"]
    assert "epoch=1" in shown and "epoch=2" not in shown
