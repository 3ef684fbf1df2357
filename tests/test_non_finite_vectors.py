"""NaN or inf vectors are refused when a file is read, and never written by any of our writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from ti_trainer.analysis import compare
from ti_trainer.analysis.run_files import RunInfo
from ti_trainer.analysis.use_step import use_step
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import (
    embedding_to_dict,
    load_embedding,
    load_optimizer_state,
    optimizer_state_path,
    save_embedding,
    save_optimizer_state,
    torch_save_for_a1111,
)
from ti_trainer.embeddings.png import (
    TEXT_CHUNK_KEY,
    add_embedding_to_image,
    encode_embedding_text,
    save_image_with_embedding,
)
from ti_trainer.errors import UserError
from ti_trainer.training import outputs
from ti_trainer.training.loop import TrainingHooks, train

BAD_VALUES = [float("nan"), float("inf"), float("-inf")]


def poisoned(width: int, value: float, name: str = "bad", step: int = 0) -> Embedding:
    vectors = torch.full((2, width), 0.1)
    vectors[1, 3] = value
    return Embedding(name, vectors, step=step)


def write_bypassing_checks(embedding: Embedding, path: Path) -> Path:
    """A damaged file as another tool (or a diverged run of older code) leaves it: our writers refuse to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({"emb_params": embedding.vectors.contiguous()}, str(path))
    elif path.suffix == ".png":
        data = embedding_to_dict(embedding)
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_CHUNK_KEY, encode_embedding_text(data))
        add_embedding_to_image(Image.new("RGB", (64, 64)), data, "bad").save(path, pnginfo=info)
    else:
        torch_save_for_a1111(embedding_to_dict(embedding), path)
    return path


def no_step_allowed(report):
    raise AssertionError("a training step ran on non-finite vectors")


@pytest.mark.parametrize("value", BAD_VALUES)
def test_training_refuses_a_starting_embedding_with_non_finite_vectors(backend, make_config, tmp_path, value):
    config = make_config(name="bad", create=False)
    source = write_bypassing_checks(poisoned(backend.text_width, value), tmp_path / "embeddings" / "bad.pt")
    before = source.read_bytes()

    with pytest.raises(UserError, match="NaN or infinite") as error:
        train(config, backend, TrainingHooks(on_step=no_step_allowed, on_message=lambda t: None))

    assert "bad.pt" in str(error.value) and "Delete it" in str(error.value)
    assert source.read_bytes() == before
    assert not list((tmp_path / "logs").rglob("*.pt")), "no copy of the damaged vectors was written"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".png"])
def test_every_format_refuses_non_finite_vectors_on_load(tmp_path, suffix):
    path = write_bypassing_checks(poisoned(32, float("nan")), tmp_path / f"bad{suffix}")
    with pytest.raises(UserError, match="NaN or infinite") as error:
        load_embedding(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("value", BAD_VALUES)
def test_no_writer_writes_non_finite_vectors(tmp_path, value):
    good = Embedding("emb", torch.full((2, 32), 0.5), step=4)
    target = save_embedding(good, tmp_path / "emb.pt")
    save_optimizer_state(good, target, {"state": {}, "param_groups": []})
    kept = {path: path.read_bytes() for path in tmp_path.iterdir()}
    bad = poisoned(32, value, "emb", step=6)
    folders = outputs.RunFolders(tmp_path / "run")
    image = Image.new("RGB", (64, 64))

    writes = {
        "pt": lambda: save_embedding(bad, target),
        "safetensors": lambda: save_embedding(bad, tmp_path / "emb.safetensors"),
        "optimizer": lambda: save_optimizer_state(bad, target, {"state": {}, "param_groups": []}),
        "image": lambda: save_image_with_embedding(image, embedding_to_dict(bad), tmp_path / "emb.png", "t"),
        "step copy": lambda: outputs.save_step_copy(folders, bad, None, {}),
        "current": lambda: outputs.save_current(bad, target, {"state": {}, "param_groups": []}, {}),
        "preview carrier": lambda: outputs.save_preview_with_embedding(folders, bad, image),
    }
    for what, write in writes.items():
        with pytest.raises(UserError, match="NaN or infinite"):
            write()
        assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == kept, what
    assert not [path for path in folders.root.rglob("*") if path.is_file()]


def fake_run(root: Path, name: str, copies: dict[int, Embedding]) -> RunInfo:
    """A run folder as training leaves it: settings and `embeddings/<name>-<step>.pt` copies."""
    root.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(embedding_name=name, width=64, height=64, seed=7)
    (root / "settings-2024-01-01-00-00-00.json").write_text(
        json.dumps({"ti_trainer_config": config.to_dict()}), encoding="utf-8"
    )
    for step, embedding in copies.items():
        write_bypassing_checks(embedding, root / "embeddings" / f"{name}-{step}.pt")
    return RunInfo.open(root)


def test_use_step_and_compare_refuse_a_copy_with_non_finite_vectors(tmp_path):
    good = Embedding("emb", torch.full((1, 32), 0.5), step=2)
    run = fake_run(tmp_path / "run", "emb", {2: good, 4: poisoned(32, float("nan"), "emb", 4)})
    embeddings = tmp_path / "embeddings"

    with pytest.raises(UserError, match="NaN or infinite"):
        use_step(run, 4, "picked", embeddings)
    assert not embeddings.exists() or not list(embeddings.iterdir())
    assert not optimizer_state_path(embeddings / "picked.pt").exists()

    def render(request):
        raise AssertionError("nothing is rendered from a damaged copy")

    with pytest.raises(UserError, match="NaN or infinite"):
        compare.render_grid(run, compare.CompareSettings(prompts=["a cat, [name]"]), render, steps=[2, 4])
    assert use_step(run, 2, "picked", embeddings).is_file()


def test_optimizer_state_with_non_finite_moments_is_not_resumed(tmp_path):
    # Adam's moments holding NaN would make the first resumed update NaN, whatever the gradient.
    embedding = Embedding("emb", torch.full((1, 32), 0.5), step=4)
    target = save_embedding(embedding, tmp_path / "emb.pt")
    moments = {"step": torch.tensor(4.0), "exp_avg": torch.zeros(1, 32), "exp_avg_sq": torch.zeros(1, 32)}
    state = {"state": {0: moments}, "param_groups": [{"lr": 0.005, "params": [0]}]}
    save_optimizer_state(embedding, target, state)
    assert load_optimizer_state(embedding, target) is not None

    moments["exp_avg_sq"][0, 5] = float("nan")
    torch_save_for_a1111(
        {"hash": embedding.checksum(), "optimizer_state_dict": state}, optimizer_state_path(target)
    )
    assert load_optimizer_state(embedding, target) is None
