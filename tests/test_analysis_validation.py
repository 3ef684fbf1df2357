"""The monitors on the tiny SD2 model: a fixed validation batch, a deterministic CSV, norms, early stopping."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import quick_config

from ti_trainer.analysis import fixed_batch, monitors
from ti_trainer.analysis.early_stopping import StoppingCheck
from ti_trainer.analysis.monitors import monitors_for
from ti_trainer.analysis.run_files import NORMS_CSV, SUMMARY_JSON, VALIDATION_CSV, RunInfo
from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.training.loop import TrainingHooks, TrainResult, train


def make_config(root: Path, backend, name: str = "testemb", **overrides) -> TrainConfig:
    """A fast run with an evaluation every 2 steps."""
    return quick_config(root, backend, name, validate_every=2, **overrides)


def run_with_monitors(config: TrainConfig, backend, messages: list[str] | None = None) -> TrainResult:
    sink = messages.append if messages is not None else lambda text: None
    hooks = TrainingHooks(on_message=sink, monitors=monitors_for(config, on_message=sink))
    return train(config, backend, hooks)


@dataclass
class Runs:
    backend: object
    watched: TrainResult  # seed 7, with monitors, lr 0.05 (its vectors outgrow the tiny model's words)
    again: TrainResult  # the same config, trained again
    plain: TrainResult  # the same config without monitors
    other_seed: TrainResult
    initial: torch.Tensor
    messages: list[str] = field(default_factory=list)
    evaluated: list = field(default_factory=list)  # the validation batch at every evaluation of `watched`


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    backend = tiny_backend("v")
    root = tmp_path_factory.mktemp("validation")
    evaluated, messages = [], []
    real = fixed_batch.sample_losses

    def spy(backend, batch, vectors, max_batch, precision="auto"):
        evaluated.append(
            [(s.image_index, s.timestep, s.prompt, s.latent.clone(), s.noise.clone()) for s in batch.samples]
        )
        return real(backend, batch, vectors, max_batch, precision)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(monitors, "sample_losses", spy)
        config = make_config(root / "a", backend, learn_rate="0.05")
        initial = load_embedding(Path(config.embeddings_dir) / "testemb.pt").vectors
        watched = run_with_monitors(config, backend, messages)
    again = run_with_monitors(make_config(root / "b", backend, learn_rate="0.05"), backend)
    plain = train(
        make_config(root / "c", backend, learn_rate="0.05"), backend, TrainingHooks(on_message=lambda t: None)
    )
    other = run_with_monitors(make_config(root / "d", backend, learn_rate="0.05", seed=8), backend)
    return Runs(backend, watched, again, plain, other, initial, messages, evaluated)


def test_validation_batch_is_identical_at_every_evaluation(runs):
    seen = runs.evaluated
    assert len(seen) == 4  # steps 0 (the start), 2, 4 and 6
    first = seen[0]
    assert len(first) == 4  # batch 2 x accumulation 1 -> DVAR's minimum of 4 samples
    assert len({s[1] for s in first}) == 4, "each sample draws its own range of timesteps"
    for other in seen[1:]:
        for a, b in zip(first, other):
            assert a[:3] == b[:3]
            assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_evaluation_is_deterministic_and_does_not_touch_the_vectors(runs):
    from ti_trainer.images import load_folder
    from ti_trainer.training.data import encode_dataset, prepare_images

    backend = runs.backend
    config = RunInfo.open(runs.watched.log_folder).config
    folder = load_folder(config.data_dir, False, "", " ")
    images = encode_dataset(backend, prepare_images(folder.images, 64, 64, False, False), "once", False, 7)
    prompts = fixed_batch.fixed_prompts(config, "testemb", [i.caption for i in images], 7)
    batch_a = fixed_batch.validation_batch(images, prompts, "testemb", 7, 1000)
    batch_b = fixed_batch.validation_batch(images, prompts, "testemb", 7, 1000)
    vectors = load_embedding(runs.watched.embedding_path).vectors
    before = vectors.clone()
    losses_a = fixed_batch.sample_losses(backend, batch_a, vectors, 2, "fp32")
    losses_b = fixed_batch.sample_losses(backend, batch_b, vectors, 4, "fp32")
    assert torch.allclose(losses_a, losses_b, rtol=1e-5, atol=1e-7)
    assert torch.equal(vectors, before)
    # The prompts are the template's, with the caption whole: no tag shuffle or dropout.
    assert all(p.startswith("a ") and p.endswith("testemb") for p in prompts)


def test_validation_csv_is_identical_across_two_runs_with_one_seed(runs):
    csv_a = (runs.watched.log_folder / VALIDATION_CSV).read_text()
    assert csv_a == (runs.again.log_folder / VALIDATION_CSV).read_text()
    assert csv_a != (runs.other_seed.log_folder / VALIDATION_CSV).read_text()
    rows = [line.split(",") for line in csv_a.splitlines()]
    assert rows[0] == ["step", "loss", "variance_ratio"]
    assert [int(r[0]) for r in rows[1:]] == [0, 2, 4, 6]
    assert len({r[1] for r in rows[1:]}) == 4, "the loss moves with the embedding"


def test_monitors_do_not_change_what_is_trained(runs):
    watched = load_embedding(runs.watched.embedding_path).vectors
    assert torch.equal(watched, load_embedding(runs.plain.embedding_path).vectors)


def test_norms_are_recorded_against_the_model_range(runs):
    result = runs.watched
    steps, rows = RunInfo.open(result.log_folder).norms()
    assert steps == [0, 1, 2, 4, 6]
    assert len(rows[0]) == 2  # one column per vector
    assert rows[0] == pytest.approx(runs.initial.norm(dim=1).tolist(), rel=1e-6)
    final = load_embedding(result.embedding_path).vectors.norm(dim=1).tolist()
    assert rows[-1] == pytest.approx(final, rel=1e-6)
    assert rows[-1] != rows[0]
    reference = json.loads((result.log_folder / SUMMARY_JSON).read_text())["norm_range"]
    assert 0 < reference["low"] < reference["median"] < reference["high"]
    # The tiny model's words are short; lr 0.05 pushes the vectors past them, and the artist is told once.
    assert max(rows[-1]) > reference["high"]
    warnings = [m for m in runs.messages if "ordinary words" in m]
    assert len(warnings) == 1 and "compare" in warnings[0]
    assert (result.log_folder / NORMS_CSV).read_text().startswith("step,vector_0,vector_1")


@pytest.fixture
def backend_and_root(tmp_path):
    return tiny_backend("v"), tmp_path


def test_early_stopping_stops_at_a_step_boundary_and_keeps_the_copies(backend_and_root, monkeypatch):
    backend, root = backend_and_root

    def plateau_at_step_4(losses, rule):
        return StoppingCheck(0.01, False, len(losses) >= 3)  # evaluations at steps 0, 2, 4

    monkeypatch.setattr(monitors.early_stopping, "check", plateau_at_step_4)
    messages = []
    result = run_with_monitors(make_config(root, backend, max_steps=10), backend, messages)

    assert result.stopped_by_monitor and result.steps_done == 4
    assert sorted(p.name for p in (result.log_folder / "embeddings").glob("*.pt")) == [
        "testemb-2.pt",
        "testemb-4.pt",
    ]
    summary = json.loads((result.log_folder / SUMMARY_JSON).read_text())
    assert summary["suggested_step"] == 4 and summary["stopped_early"] is True
    assert any(m.startswith("Stopping early at step 4") for m in messages)


def test_with_early_stopping_off_the_rule_only_suggests(backend_and_root, monkeypatch):
    backend, root = backend_and_root
    monkeypatch.setattr(
        monitors.early_stopping, "check", lambda losses, rule: StoppingCheck(0.01, False, len(losses) >= 3)
    )
    config = make_config(root, backend, max_steps=6, save_every=3, early_stopping=False)
    result = run_with_monitors(config, backend)

    assert not result.stopped_by_monitor and result.steps_done == 6
    assert (result.log_folder / "embeddings" / "testemb-4.pt").is_file(), "the suggested step gets a copy"
    assert json.loads((result.log_folder / SUMMARY_JSON).read_text())["suggested_step"] == 4
