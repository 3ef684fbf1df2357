"""What keeps the monitors cheap (docs/monitors.md): the loop's reads from the device, the per-image report
read off the training passes, the validation batch in one call, the norms' cadence, CFG in one UNet call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ti_trainer.analysis import fixed_batch, image_report, monitors
from ti_trainer.analysis.image_report import REPORT_PASSES, PassTally
from ti_trainer.analysis.monitors import NormMonitor, evaluation_batch, monitors_for
from ti_trainer.analysis.run_files import IMAGE_REPORT_CSV, RunInfo
from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.config import TrainConfig
from ti_trainer.memory.plan import MemoryPlan
from ti_trainer.training import loop
from ti_trainer.training.data import TrainingImage
from ti_trainer.training.loop import TrainingHooks, train

QUIET = TrainingHooks(on_message=lambda text: None)


# --- the loop's reads from the device ------------------------------------------------------------------------


def test_the_loss_is_read_once_per_step_not_per_micro_batch(backend, make_config, monkeypatch):
    reads = []
    real_item = torch.Tensor.item

    def counting_item(tensor):
        reads.append(tuple(tensor.shape))
        return real_item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    # 4 images at batch 1 and accumulation 4: 12 micro-batches in 3 steps.
    config = make_config(batch_size=1, gradient_accumulation=4, max_steps=3, save_every=0)
    result = train(config, backend, TrainingHooks(on_message=lambda text: None))
    assert result.steps_done == 3
    assert len(reads) < 12, f"{len(reads)} reads of a tensor for 12 micro-batches"


def test_the_vectors_are_copied_off_the_device_only_to_save_or_preview(backend, make_config, monkeypatch):
    copies, seen_at_step = [], []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(tensor, *args, **kwargs):
        copies.append(tuple(tensor.shape))
        return real_cpu(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    hooks = TrainingHooks(
        on_message=lambda text: None, on_step=lambda report: seen_at_step.append(len(copies))
    )
    train(make_config(vectors=3, max_steps=5, save_every=0), backend, hooks)
    vectors_shape = (3, backend.text_width)
    between = copies[seen_at_step[0] : seen_at_step[-1]]
    assert vectors_shape not in between, "a copy of the vectors between steps with nothing to save"
    assert vectors_shape in copies[seen_at_step[-1] :], "the end of the run saves them"


# --- the per-image report from the training passes --------------------------------------------------------


def images(count: int) -> list[TrainingImage]:
    return [TrainingImage(f"caption {i}", f"/data/{i:02d}.png", None, None, None) for i in range(count)]


def test_a_tally_averages_each_images_latest_passes_into_shares():
    tally = PassTally(images(3))
    assert not tally.has_passes(1)
    for _ in range(REPORT_PASSES + 2):  # older passes fall out of the window
        tally.add(0, torch.tensor(9.0), torch.tensor([30.0, 40.0]))  # length 50
    for _ in range(REPORT_PASSES):
        tally.add(0, torch.tensor(1.0), torch.tensor([3.0, 4.0]))  # length 5: the latest, all kept
        tally.add(1, torch.tensor(2.0), torch.tensor([0.0, 5.0]))
        tally.add(2, torch.tensor(4.0), torch.tensor([0.0, 10.0]))
    tally.add(2, torch.tensor(float("nan")), torch.tensor([float("nan"), 0.0]))  # a skipped step
    assert tally.has_passes(REPORT_PASSES)

    rows = tally.rows()
    assert [row.image for row in rows] == ["00.png", "01.png", "02.png"]
    assert [row.loss for row in rows] == pytest.approx([1.0, 2.0, 4.0])
    assert [row.gradient_share for row in rows] == pytest.approx([0.25, 0.25, 0.5])


def test_at_batch_one_the_report_comes_from_the_passes_without_a_probe(backend, make_config, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran: the report should come from the training passes")

    monkeypatch.setattr(image_report, "sample_gradients", no_probe)
    monkeypatch.setattr(fixed_batch, "sample_gradients", no_probe)
    # 4 images, batch 1, accumulation 2: every image gets a pass every 2 steps.
    first = 2 * REPORT_PASSES
    config = make_config(batch_size=1, gradient_accumulation=2, max_steps=first + 3, validate_every=50)
    messages = []
    hooks = TrainingHooks(on_message=messages.append, monitors=monitors_for(config, messages.append))
    result = train(config, backend, hooks)

    run = RunInfo.open(result.log_folder)
    for step in (first, first + 3):
        chosen, rows = run.image_report(step)
        assert chosen == step and len(rows) == 4
        assert sum(float(row["gradient_share"]) for row in rows) == pytest.approx(1.0, abs=1e-4)
        assert all(float(row["loss"]) > 0 for row in rows)
    steps = {row["step"] for row in _rows(result.log_folder / IMAGE_REPORT_CSV)}
    assert steps == {str(first), str(first + 3)}


def test_a_pass_carries_its_micro_batchs_own_gradient(backend, make_config, monkeypatch):
    """At batch 1 and accumulation 2, each pass's gradient is that one image's, measured independently."""
    expected, passes = [], []
    real_step_loss = loop.step_loss

    def step_loss_and_its_gradient(*args, **kwargs):
        loss = real_step_loss(*args, **kwargs)
        vectors = next(iter(args[6].values()))
        expected.append(torch.autograd.grad(loss, vectors, retain_graph=True)[0].clone())
        return loss

    class Recorder:
        def start(self, context):
            pass

        def after_pass(self, done):
            passes.append(done)

        def after_step(self, step, vectors):
            return False

        def finish(self, step):
            pass

    monkeypatch.setattr(loop, "step_loss", step_loss_and_its_gradient)
    config = make_config(batch_size=1, gradient_accumulation=2, max_steps=2, save_every=0)
    train(config, backend, TrainingHooks(on_message=lambda text: None, monitors=[Recorder()]))

    assert [p.step for p in passes] == [1, 1, 2, 2]
    assert all(len(p.images) == 1 for p in passes)
    assert len(expected) == len(passes)
    for done, gradient in zip(passes, expected):
        assert gradient.abs().sum() > 0
        assert torch.allclose(done.gradient, gradient, rtol=1e-4, atol=1e-8)


def test_above_batch_one_the_report_is_measured_on_the_probe(backend, make_config, monkeypatch):
    calls = []
    real = image_report.sample_gradients

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(image_report, "sample_gradients", counted)
    config = make_config(max_steps=3, validate_every=50)  # batch 2
    result = train(config, backend, TrainingHooks(on_message=print, monitors=monitors_for(config, print)))
    assert len(calls) == 2  # the start and the end
    assert {row["step"] for row in _rows(result.log_folder / IMAGE_REPORT_CSV)} == {"0", "3"}


def _rows(path):
    from ti_trainer.analysis.run_files import read_rows

    return read_rows(path)


# --- cadences and batches -----------------------------------------------------------------------------------


def test_the_validation_batch_goes_through_in_one_call_unless_the_run_checkpoints():
    def context(checkpointing: str, batch: int):
        return SimpleNamespace(
            memory_plan=MemoryPlan(checkpointing=checkpointing), data=SimpleNamespace(batch_size=batch)
        )

    assert evaluation_batch(context("off", 1), 4) == 4
    assert evaluation_batch(context("off", 6), 6) == 6
    assert evaluation_batch(context("high-res", 1), 4) == 1
    assert evaluation_batch(context("all", 2), 4) == 2


def test_norms_are_checked_every_ten_steps_or_at_a_shorter_cadence():
    def norm_every(**settings) -> int:
        found = [m for m in monitors_for(TrainConfig(**settings), print) if isinstance(m, NormMonitor)]
        return found[0].every_steps

    assert norm_every() == monitors.NORM_EVERY_STEPS == 10
    assert norm_every(validate_every=2) == 2
    assert norm_every(validate_every=0, save_every=0) == 10


def test_default_cadences_are_the_documented_ones():
    defaults = TrainConfig()
    assert (defaults.validate_every, defaults.save_every, defaults.preview_every) == (50, 50, 500)


# --- the preview sampler ---------------------------------------------------------------------------------------


def preview_request(prompt: str, negative: str = "ugly") -> PreviewRequest:
    return PreviewRequest(
        prompt=prompt,
        negative_prompt=negative,
        steps=3,
        cfg_scale=7.0,
        seed=1,
        width=64,
        height=64,
        sampler="Euler a",
        vectors={},
    )


def test_guidance_takes_one_unet_call_per_sampler_step_with_the_same_image(backend, monkeypatch):
    import numpy as np

    batches = []
    real_predict = backend.predict

    def predict(latents, t, cond):
        batches.append(latents.shape[0])
        return real_predict(latents, t, cond)

    monkeypatch.setattr(backend, "predict", predict)
    batched = np.asarray(backend.render(preview_request("a cat"))).astype(int)
    assert batches == [2, 2, 2]

    from ti_trainer.backends import diffusers_backend

    monkeypatch.setattr(
        diffusers_backend,
        "guidance_pair",
        lambda model, latents, t, cond, uncond: (
            predict(latents, t, cond).float(),
            predict(latents, t, uncond).float(),
        ),
    )
    separate = np.asarray(backend.render(preview_request("a cat"))).astype(int)
    assert np.abs(batched - separate).max() <= 1  # the same image, up to rounding


def test_a_prompt_longer_than_its_negative_is_not_padded(backend, monkeypatch):
    batches = []
    real_predict = backend.predict
    monkeypatch.setattr(
        backend,
        "predict",
        lambda latents, t, cond: batches.append(cond.shape[1]) or real_predict(latents, t, cond),
    )
    backend.render(preview_request(" ".join(["cat"] * 100)))  # two 75-token chunks; the negative takes one
    assert batches == [154, 77] * 3
