"""Writing files: a full disk or an unwritable folder is a message (the previous file intact), outputs get the
permissions the umask gives, and names and sizes stay within what file systems and memory allow."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from ti_trainer.cli import main as cli
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings import files
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.errors import UserError
from ti_trainer.fsutil import MAX_NAME_LENGTH, atomic_write, atomic_write_text, validate_embedding_name
from ti_trainer.training import outputs
from ti_trainer.training.loop import TrainingHooks, train


def leftovers(folder: Path) -> list[Path]:
    return [path for path in Path(folder).rglob("*.tmp")]


def test_a_full_disk_is_a_message_and_the_previous_file_stays(tmp_path):
    path = atomic_write_text(tmp_path / "notes.txt", "the good version")

    def fill_the_disk(tmp: Path) -> None:
        tmp.write_text("half a fi", encoding="utf-8")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(UserError) as error:
        atomic_write(path, fill_the_disk)
    message = str(error.value)
    assert str(path) in message and "free some space" in message and "previous file is kept" in message
    assert path.read_text(encoding="utf-8") == "the good version"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_folder_is_a_message_and_the_previous_embedding_stays(tmp_path, monkeypatch, code):
    # Tests run as root, where chmod does not stop writes: the folder's refusal is simulated where the
    # operating system would give it, when the temporary file is created.
    target = files.save_embedding(Embedding("emb", torch.ones(1, 32)), tmp_path / "emb.pt")
    before = target.read_bytes()
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).parent == tmp_path and flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(UserError) as error:
        files.save_embedding(Embedding("emb", torch.zeros(1, 32), step=5), target)
    message = str(error.value)
    assert "emb.pt" in message and "choose a writable folder" in message
    assert target.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_an_error_in_the_data_is_not_blamed_on_the_disk(tmp_path):
    # PIL raises OSError without an errno for data it cannot encode: that is no disk problem.
    def bad_data(tmp: Path) -> None:
        raise OSError("cannot write mode P as JPEG")

    with pytest.raises(OSError, match="cannot write mode") as error:
        atomic_write(tmp_path / "x.jpg", bad_data)
    assert not isinstance(error.value, UserError)
    assert leftovers(tmp_path) == []


def disk_full_on_call(monkeypatch, call: int) -> None:
    """`torch_save_for_a1111` (every .pt and .optim write) fills the disk from its `call`-th call on."""
    real = files.torch_save_for_a1111
    calls = []

    def save(data, path):
        calls.append(path)
        if len(calls) >= call:
            Path(path).write_bytes(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(data, path)

    monkeypatch.setattr(files, "torch_save_for_a1111", save)


def test_a_disk_that_fills_during_training_stops_the_run_with_a_message(
    backend, make_config, tmp_path, monkeypatch
):
    config = make_config(max_steps=4)
    embedding_file = tmp_path / "embeddings" / "testemb.pt"
    before = embedding_file.read_bytes()
    disk_full_on_call(monkeypatch, 3)  # the step-2 copy and its .optim are written, then the disk is full

    with pytest.raises(UserError, match="free some space") as error:
        train(config, backend, TrainingHooks(on_message=lambda t: None))
    assert "testemb.pt" in str(error.value)
    assert embedding_file.read_bytes() == before, "the previous embedding is intact"
    assert leftovers(tmp_path) == []


def test_the_cli_prints_a_disk_error_as_a_message(tmp_path, monkeypatch, capsys):
    disk_full_on_call(monkeypatch, 1)
    code = cli.main(["create", "emb", "--embeddings-dir", str(tmp_path), "--init-text", "painting"])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: Could not write") and "free some space" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_loss_log_reports_a_full_disk(tmp_path, monkeypatch):
    log = outputs.LossLog(tmp_path / outputs.LOSS_CSV, steps_per_epoch=2, resume_step=0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(UserError, match="free some space"):
        log.write(1, 0.5, 0.005)


@pytest.fixture
def umask():
    """Set the process umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask, mask, mode):
    umask(mask)
    written = [
        atomic_write_text(tmp_path / "settings.json", "{}"),
        files.save_embedding(Embedding("emb", torch.ones(1, 32)), tmp_path / "emb.pt"),
        files.save_embedding(Embedding("emb", torch.ones(1, 32)), tmp_path / "emb.safetensors"),
    ]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path.name


def test_a_name_too_long_for_file_names_is_refused():
    with pytest.raises(UserError, match=rf"300 characters long; the most is {MAX_NAME_LENGTH}"):
        validate_embedding_name("a" * 300)
    assert validate_embedding_name("a" * MAX_NAME_LENGTH) == "a" * MAX_NAME_LENGTH


def test_the_longest_name_fits_every_file_a_run_writes(backend, make_config, tmp_path):
    # The longest step copy's temporary file (".<name>-<step>.pt.optim.<random>.tmp") must stay under the
    # file systems' 255 bytes; a run with the longest name writes every kind of file.
    name = "n" * MAX_NAME_LENGTH
    config = make_config(name=name, max_steps=2, preview_every=2, preview_steps=2)
    result = train(config, backend, TrainingHooks(on_message=lambda t: None))
    for path in (
        result.log_folder / "embeddings" / f"{name}-2.pt",
        result.log_folder / "embeddings" / f"{name}-2.pt.optim",
        result.log_folder / "images" / f"{name}-2.png",
        result.log_folder / "image_embeddings" / f"{name}-2.png",
    ):
        assert path.is_file(), path.name


def test_the_cli_refuses_a_long_name_without_a_traceback(tmp_path, capsys):
    assert cli.main(["create", "x" * 300, "--embeddings-dir", str(tmp_path)]) == 2
    assert "characters long" in capsys.readouterr().err
    with pytest.raises(UserError):
        create_embedding(None, "x" * 300, "", 1, tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "label"),
    [
        ("width", 1_000_000, "Training width"),
        ("height", 4104, "Training height"),
        ("width", 32, "Training width"),
        ("preview_width", 1_000_000, "Preview width"),
        ("preview_height", 100, "Preview height"),
    ],
)
def test_image_sizes_are_bounded(field, value, label):
    with pytest.raises(UserError) as error:
        TrainConfig(**{field: value}).validate()
    assert f"{label} must be a multiple of 8 between 64 and 4096 px" in str(error.value)
    assert f"(got {value})" in str(error.value)


def test_sizes_within_the_bounds_pass():
    TrainConfig(width=4096, height=64, preview_width=0, preview_height=768).validate()


def test_the_cli_refuses_a_huge_width_before_loading_anything(tmp_path, capsys):
    assert cli.main(["train", "emb", "--width", "1000000", "--model", str(tmp_path / "no-model")]) == 2
    assert "Training width must be a multiple of 8 between 64 and 4096" in capsys.readouterr().err
