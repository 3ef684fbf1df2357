"""SDXL's text encoders lent to the GPU only for their own forward and backward (the plan's
`text_encoders_lent`, the config's `lend_text_encoders`): chosen by the plan and by need, estimated as it runs,
applied by the standalone SDXL backend and undone after. The WebUI's SDXL: tests/a1111/test_sgm_backend.py.

Only the CPU is here: where a GPU is needed, "meta" stands for it, or the device-moving calls are recorded."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types

import pytest
import torch
from conftest import quick_config
from lent_on_cpu import lent_in_other_storage
from test_config_fields import parse_train

from ti_trainer.backends import diffusers_xl_backend
from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.backends.tiny_xl import tiny_xl_backend
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.errors import UserError
from ti_trainer.memory import plan as memory_plan
from ti_trainer.memory.plan import MemoryPlan, choose_memory_plan, escalation, plan_for
from ti_trainer.training import fit, setup
from ti_trainer.training.loop import TrainingHooks, train
from ti_trainer.vram import for_config

LENT = MemoryPlan(text_encoders_lent=True)


@pytest.fixture(scope="module")
def xl():
    return tiny_xl_backend()


def weights(backend) -> dict[str, torch.Tensor]:
    modules = {"unet": backend.unet, "clip_l": backend.text_encoder, "clip_g": backend.text_encoder_2}
    return {f"{m}.{n}": t.detach().clone() for m, mod in modules.items() for n, t in mod.state_dict().items()}


def assert_same_weights(backend, before: dict) -> None:
    after = weights(backend)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.device == before[key].device and value.dtype == before[key].dtype, key
        assert torch.equal(value, before[key]), key


@pytest.fixture
def lent_forwards(monkeypatch):
    """Each text-encoder forward the SDXL backend lends, as (module, device); the lending itself still runs."""
    calls = []
    real = diffusers_xl_backend.text_encoder_lent
    monkeypatch.setattr(
        diffusers_xl_backend,
        "text_encoder_lent",
        lambda module, device: calls.append((module, device)) or real(module, device),
    )
    return calls


def on_a_gpu(monkeypatch, device_type: str = "cuda") -> types.SimpleNamespace:
    """A model the plan reads as being on a GPU (bf16 there): the plan alone, nothing runs."""
    monkeypatch.setattr(memory_plan, "resolve_precision", lambda precision, device: "bf16")
    monkeypatch.setattr(memory_plan, "xformers_available", lambda: False)
    return types.SimpleNamespace(
        device=torch.device(device_type),
        upcasts_attention=False,
        preferred_precision=None,
        lends_text_encoders=True,
    )


# --- the plan ---------------------------------------------------------------------------------------------------


def test_the_plan_lends_the_text_encoders_on_a_gpu_when_asked_and_says_so(monkeypatch):
    gpu = on_a_gpu(monkeypatch)
    lent = plan_for(TrainConfig(lend_text_encoders="on"), gpu)
    assert lent.text_encoders_lent
    assert lent.describe() == (
        "SDPA attention, checkpointing off, VAE in RAM while training, text encoders in RAM (on the GPU only "
        "for their own forward and backward), bf16 (weights too)"
    )
    # "auto" starts off (raised by need, below) and "off" is off; on the CPU there is nothing to lend.
    assert not plan_for(TrainConfig(lend_text_encoders="auto"), gpu).text_encoders_lent
    assert not plan_for(TrainConfig(lend_text_encoders="off"), gpu).text_encoders_lent
    assert "text encoders" not in plan_for(TrainConfig(), gpu).describe()
    assert not choose_memory_plan("cpu", lend_text_encoders="on").text_encoders_lent
    with pytest.raises(UserError, match="Lending the text encoders must be one of auto, on, off"):
        choose_memory_plan("cpu", lend_text_encoders="yes")


def test_the_config_field_reaches_the_plan_from_the_cli(monkeypatch):
    gpu = on_a_gpu(monkeypatch)
    assert parse_train("--lend-text-encoders", "on").lend_text_encoders == "on"
    assert plan_for(parse_train("--lend-text-encoders", "on"), gpu).text_encoders_lent
    assert not plan_for(parse_train("--lend-text-encoders", "off"), gpu).text_encoders_lent
    with pytest.raises(UserError, match="lend_text_encoders must be one of auto, on, off"):
        TrainConfig(lend_text_encoders="always").validate()


def test_a_model_that_does_not_lend_refuses_on_and_never_lends_on_auto(monkeypatch):
    sd2 = on_a_gpu(monkeypatch)
    sd2.lends_text_encoders = False
    with pytest.raises(UserError, match="not an SDXL model .* Set it to auto or off"):
        plan_for(TrainConfig(lend_text_encoders="on"), sd2)
    assert not tiny_backend("v").lends_text_encoders
    assert memory_plan.lending_asked(TrainConfig(lend_text_encoders="auto"), sd2) == "off"
    assert memory_plan.lending_asked(TrainConfig(lend_text_encoders="auto"), on_a_gpu(monkeypatch)) == "auto"


def test_auto_lends_before_it_checkpoints_more_blocks():
    plan = MemoryPlan()
    order = [
        (p.checkpointing, p.text_encoders_lent) for p in escalation(plan, checkpointing=True, lending=True)
    ]
    assert order == [
        ("off", False),
        ("off", True),
        ("high-res", False),
        ("high-res", True),
        ("all", False),
        ("all", True),
    ]
    assert [p.text_encoders_lent for p in escalation(plan, checkpointing=False, lending=True)] == [
        False,
        True,
    ]
    assert [p.checkpointing for p in escalation(LENT, checkpointing=True, lending=False)] == [
        "off",
        "high-res",
        "all",
    ]
    assert all(p.text_encoders_lent for p in escalation(LENT, checkpointing=True, lending=False))


# --- the estimate follows the lever ----------------------------------------------------------------------------


def needed_bytes(backend, plan: MemoryPlan, batch: int = 2) -> int:
    settings = for_config.settings_for_plan(plan, 64, 64, batch)
    return for_config.cached_estimate(for_config.architecture_of_backend(backend), settings).needed_bytes


def test_the_estimate_counts_lent_encoders_only_while_they_compute(xl):
    on_gpu, lent = MemoryPlan(checkpointing="all"), MemoryPlan(checkpointing="all", text_encoders_lent=True)
    settings = for_config.settings_for_plan(lent, 64, 64, 2)
    assert settings.text_encoders_lent and not settings.text_encoder_on_gpu
    assert for_config.settings_for_plan(on_gpu, 64, 64, 2).text_encoder_on_gpu
    architecture = for_config.architecture_of_backend(xl)
    resident, lent_estimate, on_cpu = (
        for_config.cached_estimate(architecture, s)
        for s in (
            for_config.settings_for_plan(on_gpu, 64, 64, 2),
            settings,
            dataclasses.replace(settings, text_encoders_lent=False),
        )
    )
    text_bytes = sum(
        t.numel() * t.element_size()
        for encoder in (xl.text_encoder, xl.text_encoder_2)
        for t in (*encoder.parameters(), *encoder.buffers())
    )
    # Lent: not among the resident weights, but their copies count while they compute, on top of the UNet's.
    assert lent_estimate.weights_bytes == on_cpu.weights_bytes < resident.weights_bytes
    assert resident.weights_bytes - lent_estimate.weights_bytes >= text_bytes
    assert lent_estimate.needed_bytes < resident.needed_bytes
    assert lent_estimate.needed_bytes >= on_cpu.needed_bytes


def test_auto_lends_where_the_estimate_says_only_lending_fits_and_off_never_does(xl, monkeypatch):
    """A budget the estimate says the batch fits in with the text encoders lent, but not on the GPU."""
    config = TrainConfig(width=64, height=64, batch_size=2, gradient_checkpointing="all")
    on_gpu_plan = for_config.gpu_plan(config, xl)
    on_gpu, lent = (
        needed_bytes(xl, on_gpu_plan),
        needed_bytes(xl, dataclasses.replace(on_gpu_plan, text_encoders_lent=True)),
    )
    assert lent < on_gpu
    budget_gib = (lent + on_gpu) / 2 / for_config.GIB

    estimate = for_config.estimate_for_config(config, xl, budget_gib)
    assert estimate.settings.text_encoders_lent and estimate.fits(int(budget_gib * for_config.GIB))
    assert "and the text encoders lent: about" in for_config.summary(estimate, budget_gib)
    off = dataclasses.replace(config, lend_text_encoders="off")
    assert not for_config.estimate_for_config(off, xl, budget_gib).settings.text_encoders_lent
    assert for_config.largest_batch_for_config(config, xl, budget_gib, limit=2) == 2
    assert for_config.largest_batch_for_config(off, xl, budget_gib, limit=2) < 2

    # The run's probes start where the estimate says the batch fits: with the encoders lent.
    monkeypatch.setattr(fit, "gpu_budget_bytes", lambda device: int(budget_gib * for_config.GIB))
    candidates = for_config.plans_by_need(config, xl, on_gpu_plan)
    assert [p.text_encoders_lent for p in candidates] == [False, True]
    assert fit._candidates_from_estimate(candidates, xl, (8, 8), 2, 1) == candidates[1:]
    assert for_config.plans_by_need(off, xl, on_gpu_plan) == [on_gpu_plan]


# --- the standalone SDXL backend applies it, and undoes it ------------------------------------------------------


def test_the_encoders_wait_in_ram_for_the_run_and_go_back_where_they_were(xl, monkeypatch):
    # The "GPU" is simulated: the encoders claim to live on cuda:0, and their moves are recorded.
    names = {id(xl.text_encoder): "clip_l", id(xl.text_encoder_2): "clip_g"}
    real_device_of = memory_plan.device_of
    monkeypatch.setattr(
        memory_plan, "device_of", lambda m: torch.device("cuda", 0) if id(m) in names else real_device_of(m)
    )
    moves = []
    for encoder in (xl.text_encoder, xl.text_encoder_2):
        monkeypatch.setattr(
            encoder, "to", lambda device, e=encoder: moves.append((names[id(e)], torch.device(device))) or e
        )
    with xl.memory_levers(MemoryPlan()):
        assert moves == []
    with xl.memory_levers(LENT):
        assert moves == [("clip_l", torch.device("cpu")), ("clip_g", torch.device("cpu"))]
    assert moves[2:] == [("clip_g", torch.device("cuda", 0)), ("clip_l", torch.device("cuda", 0))]


def test_a_lent_encoder_computes_on_the_device_and_keeps_its_ram_storage(xl, monkeypatch):
    # "meta" stands for the GPU: the prompt's tokens go there, and so does each encoder for its forward.
    monkeypatch.setattr(xl, "device", torch.device("meta"))
    monkeypatch.setattr(xl.prompt_encoder, "device", torch.device("meta"))
    encoders = (xl.text_encoder, xl.text_encoder_2)
    storage = [[t.data_ptr() for t in (*e.parameters(), *e.buffers())] for e in encoders]
    seen = []
    handles = [
        encoder.register_forward_pre_hook(
            lambda module, args: seen.append(
                {t.device.type for t in (*module.parameters(), *module.buffers())}
            )
        )
        for encoder in encoders
    ]
    try:
        with xl.memory_levers(LENT):
            cond = xl.prompt_encoder(["a red cat"], {})
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [{"meta"}, {"meta"}] and cond.hidden.device.type == "meta"
    assert [[t.data_ptr() for t in (*e.parameters(), *e.buffers())] for e in encoders] == storage
    assert {t.device.type for e in encoders for t in e.parameters()} == {"cpu"}


def quiet(messages: list | None = None) -> TrainingHooks:
    return TrainingHooks(on_message=messages.append if messages is not None else lambda text: None)


def test_a_run_with_the_encoders_lent_trains_the_same_vectors(xl, tmp_path, lent_forwards, monkeypatch):
    """Each encoder's forward lent, and what its backward keeps packed as on a GPU (the lending stood in for
    on the CPU: tests/lent_on_cpu.py): the vectors must come out bit for bit as without the lever, and the
    model as it was."""
    before = weights(xl)
    plain = train(quick_config(tmp_path, xl, name="plain", save_format="safetensors"), xl, quiet())
    assert lent_forwards == []
    recorded = diffusers_xl_backend.text_encoder_lent

    @contextlib.contextmanager
    def lent_as_on_a_gpu(module, device):
        with recorded(module, device), lent_in_other_storage(module, device):
            yield

    monkeypatch.setattr(diffusers_xl_backend, "text_encoder_lent", lent_as_on_a_gpu)
    run_plan = setup.plan_for
    monkeypatch.setattr(
        setup, "plan_for", lambda c, b: dataclasses.replace(run_plan(c, b), text_encoders_lent=True)
    )
    messages = []
    lent = train(quick_config(tmp_path, xl, name="lent", save_format="safetensors"), xl, quiet(messages))
    assert any(m.startswith("Memory: ") and "text encoders in RAM" in m for m in messages)
    assert {id(module) for module, _ in lent_forwards} == {id(xl.text_encoder), id(xl.text_encoder_2)}
    a, b = load_embedding(plain.embedding_path), load_embedding(lent.embedding_path)
    assert a.step == b.step == 6
    for key in ("clip_l", "clip_g"):
        assert torch.equal(a.vectors[key], b.vectors[key]), key
    assert_same_weights(xl, before)
    assert all(p.grad is None and not p.requires_grad for p in xl.text_encoder_2.parameters())


@contextlib.contextmanager
def fits_only_lent(backend, lent_forwards: list):
    """Out of memory in the UNet's training step unless the text encoders were lent for its prompt, as
    SDXL at 1024 px, batch 2 on an 8 GB card."""
    seen = [len(lent_forwards)]

    def hook(module, args):
        if torch.is_grad_enabled() and len(lent_forwards) == seen[0]:
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 1.50 GiB (a test's limit)"
            )
        seen[0] = len(lent_forwards)

    handle = backend.unet.mid_block.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_auto_lends_by_need_before_checkpointing_and_off_never_does(xl, tmp_path, lent_forwards, monkeypatch):
    monkeypatch.setattr(
        fit, "memory_for_training", functools.partial(fit.memory_for_training, probe_first=True)
    )
    before = weights(xl)
    messages = []
    with fits_only_lent(xl, lent_forwards):
        result = train(quick_config(tmp_path, xl, name="auto", max_steps=2), xl, quiet(messages))
    assert result.steps_done == 2
    # Lent at checkpointing "off": lending is tried before more checkpointing.
    assert (
        "Memory: SDPA attention, checkpointing off, VAE stays where it is, text encoders in RAM (on the GPU "
        "only for their own forward and backward), fp32" in messages
    )
    assert_same_weights(xl, before)

    lent_forwards.clear()
    config = quick_config(tmp_path, xl, name="never", lend_text_encoders="off", max_steps=2)
    with fits_only_lent(xl, lent_forwards), pytest.raises(UserError, match="would run out of GPU memory"):
        train(config, xl, quiet())
    assert lent_forwards == []
    assert_same_weights(xl, before)


def test_the_estimate_verb_estimates_with_the_text_encoders_lent(capsys):
    from ti_trainer.cli.main import main

    argv = ["estimate", "--model", "tiny-sdxl", "--width", "64", "--batch", "1", "--checkpointing", "all"]
    assert main([*argv, "--lend-text-encoders"]) == 0
    lent = capsys.readouterr().out
    assert "text encoder lent to the GPU for its forward and backward" in lent
    assert main(argv) == 0
    resident = capsys.readouterr().out
    assert "text encoder on the GPU" in resident
    assert "text encoder lent" not in resident
