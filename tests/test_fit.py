"""The fit finder and out-of-memory handling, on the CPU: a fake allocation limit raises CUDA's
out-of-memory error from inside the real UNet's forward pass, past the point where half its activations
exist, so the search, the recovery and the advice run as they would on a GPU."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.errors import UserError
from ti_trainer.training import fit
from ti_trainer.training.loop import TrainingHooks, train


def checkpointing_level(unet) -> str:
    if unet.mid_block.gradient_checkpointing:
        return "all"
    return "high-res" if unet.up_blocks[-1].gradient_checkpointing else "off"


@contextlib.contextmanager
def allocation_limit(backend, max_batch=None, max_area=None):
    """Out of memory in the UNet's middle block when the batch (or batch x area there) is over the limit.
    `max_batch` may be a dict by checkpointing level: more checkpointing, more room."""
    unet = backend.unet

    def hook(module, args):
        hidden = args[0]
        batch, area = hidden.shape[0], hidden.shape[0] * hidden.shape[-2] * hidden.shape[-1]
        limit = max_batch[checkpointing_level(unet)] if isinstance(max_batch, dict) else max_batch
        if (limit is not None and batch > limit) or (max_area is not None and area > max_area):
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (a test's limit)"
            )

    handle = unet.mid_block.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def model_state(backend) -> dict:
    modules = {"unet": backend.unet, "vae": backend.vae, "text": backend.text_encoder}
    return {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.state_dict().items()}


def assert_model_intact(backend, before: dict) -> None:
    for key, value in model_state(backend).items():
        assert torch.equal(value, before[key]), key
    for module in (backend.unet, backend.vae, backend.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert backend.prompt_encoder.count_injections(f"a {fit.PROBE_NAME}", fit.PROBE_NAME) == 0


@pytest.fixture(scope="module")
def backend():
    """One tiny model for the module: every test here also checks that it is left as it was found."""
    return tiny_backend("v")


def quiet(**overrides) -> TrainingHooks:
    return TrainingHooks(on_message=lambda text: None, **overrides)


@pytest.mark.parametrize(
    ("max_batch", "limit", "tried", "found"),
    [
        (5, 64, [1, 2, 4, 8, 6, 5], 5),
        (0, 64, [1], 0),
        (12, 12, [1, 2, 4, 8, 12], 12),
        (7, 12, [1, 2, 4, 8, 6, 7], 7),
    ],
)
def test_largest_batch_doubles_then_bisects(max_batch, limit, tried, found):
    calls = []

    def step(batch):
        calls.append(batch)
        if batch > max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    assert fit.largest_batch(step, limit) == found
    assert calls == tried


def test_other_errors_are_not_mistaken_for_memory():
    def step(batch):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        fit.fits(step, 1)
    assert fit.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not fit.is_out_of_memory(RuntimeError("size mismatch"))


def test_probe_on_the_real_backend_recovers_and_leaves_the_model_intact(backend, make_config):
    before = model_state(backend)
    step = fit.training_step_probe(backend, (8, 8), "fp32", num_vectors=2)
    with allocation_limit(backend, max_batch=3):
        assert fit.largest_batch(step, limit=16) == 3
    assert_model_intact(backend, before)
    train(make_config(max_steps=2), backend, quiet())  # and it still trains


def test_find_largest_batch_reports_every_checkpointing_level(backend):
    config = TrainConfig(width=64, height=64)
    before = model_state(backend)
    with allocation_limit(backend, max_batch={"off": 1, "high-res": 2, "all": 5}):
        report = fit.find_largest_batch(config, backend, limit=8)
    assert report.batches == {"off": 1, "high-res": 2, "all": 5}
    assert report.best == ("all", 5)
    assert report.describe() == (
        "At 64x64 px: batch 1 with checkpointing off; batch 2 with the high-resolution blocks checkpointed; "
        "batch 5 with every block checkpointed."
    )
    assert_model_intact(backend, before)

    with allocation_limit(backend, max_batch=8):  # enough without checkpointing: stop searching there
        assert fit.find_largest_batch(config, backend, limit=8).batches == {"off": 8}


@pytest.fixture
def probing_first(monkeypatch):
    """The run probes before training, as it does on a GPU."""
    monkeypatch.setattr(
        fit, "memory_for_training", functools.partial(fit.memory_for_training, probe_first=True)
    )


def test_checkpointing_is_raised_only_as_far_as_the_batch_needs(backend, make_config, probing_first):
    messages = []
    with allocation_limit(backend, max_batch={"off": 1, "high-res": 2, "all": 4}):
        result = train(
            make_config(batch_size=2, max_steps=2), backend, TrainingHooks(on_message=messages.append)
        )
    assert result.steps_done == 2
    assert (
        "Memory: SDPA attention, checkpointing of the high-resolution UNet blocks, VAE stays where it is, fp32"
        in messages
    )
    assert checkpointing_level(backend.unet) == "off"  # undone after the run


def test_a_batch_that_fits_nowhere_is_reported_before_training(backend, make_config, tmp_path, probing_first):
    steps = []
    before = model_state(backend)
    config = make_config(batch_size=4, gradient_accumulation=1, max_steps=2)
    limit = allocation_limit(backend, max_batch={"off": 1, "high-res": 1, "all": 2})
    with limit, pytest.raises(UserError) as error:
        train(config, backend, quiet(on_step=steps.append))
    assert str(error.value) == (
        "Training would run out of GPU memory at batch 4, 64x64 px (memory: SDPA attention, checkpointing of "
        "every UNet block, VAE stays where it is, fp32). Batch 2 fits at this size: set the batch size to 2 and "
        "gradient accumulation to 2 to keep about 4 images per step."
    )
    assert steps == []
    assert load_embedding(tmp_path / "embeddings" / "testemb.pt").step in (0, None)
    assert_model_intact(backend, before)

    # A level chosen by the user is checked as it is.
    config = make_config(batch_size=2, gradient_checkpointing="off", max_steps=2)
    with allocation_limit(backend, max_batch=1), pytest.raises(UserError, match="checkpointing off") as error:
        train(config, backend, quiet(on_step=steps.append))
    assert "Batch 1 fits at this size" in str(error.value) and steps == []


def test_out_of_memory_during_a_run_names_the_batch_that_fits(backend, make_config):
    before = model_state(backend)
    config = make_config(batch_size=2, gradient_accumulation=1, max_steps=2)
    with allocation_limit(backend, max_batch=1), pytest.raises(UserError) as error:
        train(config, backend, quiet())
    message = str(error.value)
    assert message.startswith("Training ran out of GPU memory at batch 2, 64x64 px (memory: SDPA attention")
    assert "Batch 1 fits at this size: set the batch size to 1 and gradient accumulation to 2" in message
    assert message.endswith("The embedding keeps its last saved step; start again to resume from it.")
    assert error.value.__cause__ is None
    assert_model_intact(backend, before)
    assert train(make_config(batch_size=2, max_steps=2), backend, quiet()).steps_done == 2


def test_when_batch_one_does_not_fit_a_smaller_size_is_named(backend, make_config):
    # 512 px is a 64x64 latent, 32x32 in the tiny UNet's middle block; the limit lets 384 px (24x24) through.
    config = make_config(batch_size=1, max_steps=1, width=512, height=512)
    with allocation_limit(backend, max_area=600), pytest.raises(UserError) as error:
        train(config, backend, quiet())
    assert "Even batch 1 does not fit at this size; 384x384 px fits at batch 1." in str(error.value)


def test_smaller_sizes_keep_the_aspect_ratio():
    sizes = fit.smaller_sizes((96, 64), 8)  # 512x768 px, portrait
    assert sizes[0] == (88, 56) and sizes[-1] == (32, 24)
    assert all(h > w and h % 8 == 0 and w % 8 == 0 for h, w in sizes)


@pytest.mark.parametrize(
    ("max_batch", "start", "tried", "found"),
    [
        (9, 8, [8, 16, 12, 10, 9], 9),  # a guess just under: probed once, then doubled and bisected
        (5, 8, [8, 4, 6, 5], 5),  # a guess too high: bisected below it
        (5, 5, [5, 10, 7, 6], 5),  # the estimate's own answer: confirmed, and one more size proves it
    ],
)
def test_largest_batch_starts_from_the_estimates_guess(max_batch, start, tried, found):
    calls = []

    def step(batch):
        calls.append(batch)
        if batch > max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    assert fit.largest_batch(step, 64, start=start) == found
    assert calls == tried
    assert len(calls) < len([1, 2, 4, 8, 16]) + 3  # fewer probes than doubling from 1


def test_auto_checkpointing_probes_start_where_the_estimate_says_the_batch_fits(backend, monkeypatch):
    """On a GPU, "auto" checkpointing probes only the levels the estimate leaves open: with a budget the
    estimate says batch 2 needs every block checkpointed for, "off" and "high-res" are not even tried."""
    from ti_trainer.memory.plan import plan_for
    from ti_trainer.vram import for_config

    plan = plan_for(TrainConfig(), backend)
    latent_hw = (8, 8)
    sizes = dict(width=64, height=64, batch=2, num_vectors=1)
    estimates = {
        level: for_config.cached_estimate(
            for_config.architecture_of_backend(backend),
            for_config.settings_for_plan(plan.with_checkpointing(level), **sizes),
        ).needed_bytes
        for level in ("off", "high-res", "all")
    }
    assert estimates["all"] < estimates["off"]
    candidates = [plan.with_checkpointing(level) for level in ("off", "high-res", "all")]
    monkeypatch.setattr(fit, "gpu_budget_bytes", lambda device: estimates["all"])
    left = fit._candidates_from_estimate(candidates, backend, latent_hw, 2, 1)
    assert left == candidates[2:]
    monkeypatch.setattr(fit, "gpu_budget_bytes", lambda device: estimates["off"] * 2)
    assert fit._candidates_from_estimate(candidates, backend, latent_hw, 2, 1) == candidates
