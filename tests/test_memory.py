"""The memory plan: chosen from device and model, told in words, and the shared pieces both backends use."""

from __future__ import annotations

import pytest
import torch

from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.memory import plan as memory_plan
from ti_trainer.memory.plan import MemoryPlan, attention, choose_memory_plan, on_device, weights_in


def test_cpu_plan_is_plain_fp32_with_sdpa():
    plan = choose_memory_plan("cpu", model_upcasts_attention=True)
    assert plan == MemoryPlan(attention="sdpa", checkpointing="off", vae_offload=False, precision="fp32")
    assert plan.describe() == "SDPA attention, checkpointing off, VAE stays where it is, fp32"


def test_gpu_plan_defaults(monkeypatch):
    monkeypatch.setattr(memory_plan, "resolve_precision", lambda precision, device: "bf16")
    monkeypatch.setattr(memory_plan, "xformers_available", lambda: False)
    plan = choose_memory_plan("cuda", model_upcasts_attention=True)
    # bf16 has fp32's exponent range: SD 2.1's scores cannot overflow, so no upcast is needed.
    assert (plan.attention, plan.vae_offload, plan.precision, plan.upcast_attention) == (
        "sdpa",
        True,
        "bf16",
        False,
    )
    assert plan.weights_dtype is torch.bfloat16
    assert (
        plan.describe() == "SDPA attention, checkpointing off, VAE in RAM while training, bf16 (weights too)"
    )

    monkeypatch.setattr(memory_plan, "xformers_available", lambda: True)
    assert choose_memory_plan("cuda").attention == "xformers"


def test_fp16_upcasts_attention_for_models_that_want_it(monkeypatch):
    monkeypatch.setattr(memory_plan, "resolve_precision", lambda precision, device: "fp16")
    monkeypatch.setattr(memory_plan, "xformers_available", lambda: False)
    sd21 = choose_memory_plan("cuda", model_upcasts_attention=True)
    assert sd21.upcast_attention and sd21.weights_dtype is torch.float16
    assert sd21.describe().startswith("SDPA attention (scores in fp32)")
    assert sd21.describe().endswith("fp16 with loss scaling (weights too)")
    assert not choose_memory_plan("cuda", model_upcasts_attention=False).upcast_attention
    assert not choose_memory_plan(
        "cuda", model_upcasts_attention=True, upcast_attention="off"
    ).upcast_attention
    assert choose_memory_plan("cpu", upcast_attention="on").upcast_attention


def test_explicit_choices_and_their_mistakes(monkeypatch):
    plan = choose_memory_plan("cpu", attention="math", checkpointing="all")
    assert plan.describe().startswith("plain (math) attention, checkpointing of every UNet block")
    assert plan.with_checkpointing("high-res").checkpointing == "high-res"
    monkeypatch.setattr(memory_plan, "xformers_available", lambda: False)
    with pytest.raises(UserError, match="xformers is not installed"):
        choose_memory_plan("cpu", attention="xformers")
    with pytest.raises(UserError, match="Gradient checkpointing must be one of"):
        choose_memory_plan("cpu", checkpointing="some")


def test_config_fields_are_validated_and_read(backend):
    TrainConfig().validate()  # the defaults are valid
    with pytest.raises(UserError, match="attention must be one of"):
        TrainConfig(attention="flash").validate()
    with pytest.raises(UserError, match="gradient_checkpointing must be one of"):
        TrainConfig(gradient_checkpointing="yes").validate()
    config = TrainConfig(attention="math", gradient_checkpointing="high-res", upcast_attention="on")
    plan = memory_plan.plan_for(config, backend)
    assert (plan.attention, plan.checkpointing, plan.upcast_attention) == ("math", "high-res", True)


@pytest.mark.parametrize("kind", ["sdpa", "math"])
@pytest.mark.parametrize("upcast", [False, True])
def test_attention_kinds_agree_with_the_definition(kind, upcast):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=generator) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    assert torch.allclose(attention(q, k, v, kind, upcast), expected, atol=1e-5)
    low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kind, upcast)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), expected, atol=5e-2)


def test_upcast_attention_survives_scores_that_overflow_half_precision():
    # The SD 2.1 failure: logits beyond fp16's range give inf - inf = NaN in the softmax.
    q = torch.full((1, 1, 4, 8), 120.0).half()
    k = torch.full((1, 1, 4, 8), 120.0).half()
    v = torch.randn(1, 1, 4, 8).half()
    assert torch.isnan(attention(q, k, v, "math", upcast=False).float()).any()
    assert torch.isfinite(attention(q, k, v, "math", upcast=True).float()).all()


def test_on_device_moves_and_returns(monkeypatch):
    module = torch.nn.Linear(2, 2)
    moves = []
    monkeypatch.setattr(memory_plan, "device_of", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(module, "to", lambda device: moves.append(torch.device(device)) or module)
    with on_device(module, "cpu"):
        assert moves == [torch.device("cpu")]
    assert moves == [torch.device("cpu"), torch.device("cuda", 0)]
    moves.clear()
    with on_device(module, "cuda"):  # already there: nothing moves
        pass
    assert moves == []


def test_weights_in_half_precision_come_back_bit_for_bit():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(5, 4))
    model.register_buffer("steps", torch.arange(3))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    parameters = list(model.parameters())
    with weights_in(torch.bfloat16, model):
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        assert model.steps.dtype == torch.int64  # not floating point: untouched
    assert list(model.parameters()) == parameters  # the same Parameter objects
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
