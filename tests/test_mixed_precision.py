"""The half-precision paths a GPU takes, exercised on the CPU (its autocast does bf16 and fp16, and torch
has a CPU loss scaler): autocast engaged, the loss scaled and unscaled, fp32 vectors, nothing left changed."""

from __future__ import annotations

import pytest
import torch

from ti_trainer.analysis.monitors import monitors_for
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.memory.precision import grad_scaler
from ti_trainer.training.loop import TrainingHooks, train

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def recording_predictions(backend, monkeypatch) -> list[tuple[bool, torch.dtype]]:
    """(gradient enabled, output dtype) of every prediction: training steps run with gradients; validation
    and previews without."""
    dtypes = []
    real_predict = backend.predict

    def predict(*args, **kwargs):
        out = real_predict(*args, **kwargs)
        dtypes.append((torch.is_grad_enabled(), out.dtype))
        return out

    monkeypatch.setattr(backend, "predict", predict)
    return dtypes


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_run_trains_fp32_vectors_and_leaves_the_model_alone(
    backend, make_config, monkeypatch, precision
):
    dtypes = recording_predictions(backend, monkeypatch)
    weights = {name: p.detach().clone() for name, p in backend.unet.named_parameters()}
    config = make_config(precision=precision, max_steps=4, preview_every=2, preview_steps=2, validate_every=2)
    before = load_embedding(config.embeddings_dir + "/testemb.pt").vectors

    result = train(
        config, backend, TrainingHooks(on_message=lambda t: None, monitors=monitors_for(config, print))
    )

    assert result.steps_done == 4 and not result.skipped_steps
    assert {dtype for grad, dtype in dtypes if grad} == {HALF[precision]}, "every training step is autocast"
    assert HALF[precision] in {dtype for grad, dtype in dtypes if not grad}, "validation runs in it too"
    after = load_embedding(result.embedding_path).vectors
    assert after.dtype == torch.float32 and torch.isfinite(after).all() and not torch.equal(after, before)
    assert all(torch.equal(p, weights[name]) for name, p in backend.unet.named_parameters())


def test_fp16_scales_the_loss_and_unscales_before_the_update(backend, make_config, monkeypatch):
    scaler = grad_scaler("fp16", torch.device("cpu"))
    if scaler is None:
        pytest.skip("this torch has no CPU loss scaler")
    calls = []
    cls = type(scaler)
    real_unscale, real_scale = cls.unscale_, cls.scale
    monkeypatch.setattr(cls, "scale", lambda self, loss: calls.append("scale") or real_scale(self, loss))
    monkeypatch.setattr(cls, "unscale_", lambda self, opt: calls.append("unscale") or real_unscale(self, opt))
    train(make_config(precision="fp16", max_steps=2), backend, TrainingHooks(on_message=lambda t: None))
    assert calls == ["scale", "unscale", "scale", "unscale"]


def test_the_loop_computes_in_the_plans_precision(backend, make_config, monkeypatch):
    """A host model held in half precision (the WebUI's fp16) is trained in that precision when the config
    says "auto": the loop must follow the memory plan, not resolve "auto" on its own."""
    dtypes = recording_predictions(backend, monkeypatch)
    backend.preferred_precision = "bf16"
    messages = []
    train(make_config(precision="auto", max_steps=1), backend, TrainingHooks(on_message=messages.append))
    assert {dtype for grad, dtype in dtypes if grad} == {torch.bfloat16}
    assert any(m.startswith("Memory:") and "bf16" in m for m in messages)
