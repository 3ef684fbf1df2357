"""The memory levers on the standalone (diffusers) backend: each one active while training, undone after."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.backends.diffusers_memory import TrainingAttnProcessor, attention_layers
from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.memory import plan as memory_plan
from ti_trainer.memory.plan import MemoryPlan
from ti_trainer.training.fit import training_step_probe
from ti_trainer.training.loop import TrainingHooks, train


@pytest.fixture(scope="module")
def backend():
    """One tiny model for the module: every test here also checks that it is left as it was found."""
    return tiny_backend("v")


def processors(model) -> list:
    return [layer.processor for layer in attention_layers(model)]


@contextlib.contextmanager
def forward_counts(**modules):
    """How many times each module's forward runs (a recomputation during backward counts again)."""
    counts = dict.fromkeys(modules, 0)

    def counter(name):
        def hook(module, args):
            counts[name] += 1

        return hook

    # Pre-hooks: torch's checkpoint stops a recomputation as soon as it has what backward needs, so the
    # recomputed forward may never reach its end (or a forward hook).
    handles = [module.register_forward_pre_hook(counter(name)) for name, module in modules.items()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def probe_step(backend, precision: str = "fp32"):
    return training_step_probe(backend, (8, 8), precision, num_vectors=2)


def test_sdpa_processors_in_unet_and_vae_then_the_originals_back(backend):
    plain = AttnProcessor()
    for model in (backend.unet, backend.vae):
        for layer in attention_layers(model):
            layer.set_processor(plain)
    assert attention_layers(backend.vae), "the VAE has attention too"

    with backend.memory_levers(MemoryPlan(attention="sdpa")):
        for model in (backend.unet, backend.vae):
            assert all(isinstance(p, AttnProcessor2_0) for p in processors(model))
        probe_step(backend)(2)

    for model in (backend.unet, backend.vae):
        assert all(p is plain for p in processors(model))
        model.set_attn_processor(AttnProcessor2_0())  # the module's shared model, as built


@pytest.mark.parametrize("kind", ["sdpa", "math"])
def test_fp32_score_processor_matches_diffusers_attention(backend, kind):
    # The tiny UNet asks for upcast attention like SD 2.1; diffusers' AttnProcessor honours it.
    assert backend.upcasts_attention
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, 77, backend.text_width, generator=generator)
    timesteps = torch.tensor([10, 900])
    pixels = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        for model in (backend.unet, backend.vae):
            model.set_attn_processor(AttnProcessor())
        expected = backend.predict(latents, timesteps, cond), backend.vae.encode(pixels).latent_dist.mean
        with backend.memory_levers(MemoryPlan(attention=kind, upcast_attention=True)):
            assert all(isinstance(p, TrainingAttnProcessor) and p.upcast for p in processors(backend.unet))
            got = backend.predict(latents, timesteps, cond), backend.vae.encode(pixels).latent_dist.mean
    for model in (backend.unet, backend.vae):
        model.set_attn_processor(AttnProcessor2_0())
    for ours, theirs in zip(got, expected):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_checkpointing_recomputes_the_chosen_blocks_on_a_frozen_model_in_eval_mode(backend):
    unet = backend.unet
    # Blocks on the gradient's path (after the first cross-attention, where the text enters). The very first
    # ResNet sees only the noisy latents: nothing there needs a gradient, so nothing is stored or recomputed.
    high_res = {
        "first_transformer": unet.down_blocks[0].attentions[0].transformer_blocks[0],
        "last_up_resnet": unet.up_blocks[-1].resnets[0],
        "last_up_transformer": unet.up_blocks[-1].attentions[0].transformer_blocks[0],
    }
    # (diffusers never checkpoints the middle block's first ResNet; its second one it does.)
    low_res = {"low_res_resnet": unet.down_blocks[1].resnets[0], "middle_resnet": unet.mid_block.resnets[1]}
    step = probe_step(backend)

    def counts_for(level: str) -> dict[str, int]:
        with backend.memory_levers(MemoryPlan(checkpointing=level)):
            assert not unet.training and not any(p.requires_grad for p in unet.parameters())
            with forward_counts(**high_res, **low_res) as counts:
                step(1)
        return counts

    slots_before = [vars(m).get("_gradient_checkpointing_func", "absent") for m in unet.modules()]
    assert set(counts_for("off").values()) == {1}
    high = counts_for("high-res")
    assert [high[name] for name in high_res] == [2, 2, 2], "forward recomputed during backward"
    assert [high[name] for name in low_res] == [1, 1]
    assert set(counts_for("all").values()) == {2}
    # Undone: no flag left on, every module back in eval mode, diffusers' own function slot as it was.
    assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())
    assert not any(m.training for m in unet.modules())
    assert [vars(m).get("_gradient_checkpointing_func", "absent") for m in unet.modules()] == slots_before


def test_checkpointing_gives_the_same_gradient(backend):
    backend.prompt_encoder.chunker.register("gradprobe", 2)
    gradients = []
    for level in ("off", "all"):
        vectors = torch.randn(2, backend.text_width, generator=torch.Generator().manual_seed(1))
        vectors.requires_grad_(True)
        with backend.memory_levers(MemoryPlan(checkpointing=level)):
            cond = backend.prompt_encoder(["a gradprobe painting"] * 2, {"gradprobe": vectors})
            out = backend.predict(torch.ones(2, 4, 8, 8), torch.tensor([5, 500]), cond)
            out.square().mean().backward()
        gradients.append(vectors.grad)
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def test_vae_waits_in_ram_while_training_and_comes_back(backend, monkeypatch):
    # On a CPU-only machine the "GPU" is simulated: the VAE claims to live on cuda:0, and its moves are recorded.
    moves = []
    real_device_of = memory_plan.device_of
    monkeypatch.setattr(
        memory_plan, "device_of", lambda m: torch.device("cuda", 0) if m is backend.vae else real_device_of(m)
    )
    monkeypatch.setattr(backend.vae, "to", lambda device: moves.append(torch.device(device)) or backend.vae)
    with backend.memory_levers(MemoryPlan(vae_offload=True)):
        assert moves == [torch.device("cpu")]
    assert moves == [torch.device("cpu"), torch.device("cuda", 0)]


def test_half_weights_while_training_then_exactly_the_originals(backend):
    before = {name: p.detach().clone() for name, p in backend.unet.named_parameters()}
    text_before = {name: p.detach().clone() for name, p in backend.text_encoder.named_parameters()}
    plan = MemoryPlan(precision="bf16", half_weights=True)
    with backend.memory_levers(plan):
        assert backend.unet.dtype == torch.bfloat16 and backend.text_encoder.dtype == torch.bfloat16
        assert backend.vae.dtype == torch.float32  # encoded once; its fp16 NaNs are not worth the risk
        probe_step(backend, "bf16")(1)  # trains: bf16 weights under bf16 autocast
        request = PreviewRequest("a red circle", "", 2, 7.0, 1, 64, 64, "Euler a", {})
        assert backend.render(request).size == (64, 64)  # and previews, outside autocast
    for name, parameter in backend.unet.named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, before[name]), name
    for name, parameter in backend.text_encoder.named_parameters():
        assert torch.equal(parameter, text_before[name]), name
        assert parameter.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: real device placement")
def test_on_a_gpu_the_vae_is_in_ram_during_the_run(make_config):
    gpu_backend = tiny_backend("v", device="cuda")
    seen = []
    hooks = TrainingHooks(
        on_message=lambda t: None, on_step=lambda r: seen.append(gpu_backend.vae.device.type)
    )
    train(make_config(max_steps=2, preview_every=2), gpu_backend, hooks)
    assert seen == ["cpu", "cpu"]
    assert gpu_backend.vae.device.type == "cuda"
    assert gpu_backend.unet.dtype == gpu_backend.text_encoder.dtype == torch.float32


def test_a_run_reports_its_plan_and_leaves_the_model_as_it_was(backend, make_config):
    messages = []
    before = processors(backend.unet)
    train(make_config(max_steps=2), backend, TrainingHooks(on_message=messages.append))
    assert "Memory: SDPA attention, checkpointing off, VAE stays where it is, fp32" in messages
    assert processors(backend.unet) == before
