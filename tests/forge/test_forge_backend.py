"""The Forge backend on the stand-in's tiny model: conditioning equal to Forge's at generation time, training
through Forge's memory management, and the model and memory manager given back as found."""

from types import SimpleNamespace

import pytest
import torch
from forge_state import (
    assert_same_fingerprint,
    memory_state,
    model_fingerprint,
    model_parts,
    recorded_loads,
)

from ti_trainer.backends.contract import Backend
from ti_trainer.backends.forge_backend import ForgeBackend
from ti_trainer.backends.forge_memory import backward_bytes
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import MemoryPlan

NAME = "ftoken"
PROMPTS = [
    f"a photo of {NAME}",
    f"{NAME}, a red square on a blue circle",
    f"(a photo:1.3) of [{NAME}] in green stripes",
    f"a red square BREAK {NAME} in green",
    ", ".join(["a red square"] * 30) + f", {NAME} at the end",
]


def backend_for(forge, step_memory=None) -> ForgeBackend:
    from backend import memory_management
    from modules import shared

    return ForgeBackend(
        forge.model,
        memory_management,
        emphasis=shared.opts.emphasis,
        clip_skip=shared.opts.CLIP_stop_at_last_layers,
        step_memory=step_memory,
    )


def registered(forge, vectors: torch.Tensor):
    """`vectors` as an embedding in Forge's database, as if loaded from a file."""
    from backend.text_processing.textual_inversion import Embedding

    embedding = Embedding(vectors.clone(), NAME)
    embedding.vectors, embedding.shape = vectors.shape[0], vectors.shape[1]
    forge.engine.embeddings.register_embedding(embedding)


def generation_conditioning(forge, prompts):
    from modules import shared

    forge.model.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))  # as txt2img does
    return forge.model.get_learned_conditioning(prompts)


def test_it_has_every_member_of_the_contract(forge):
    backend = backend_for(forge)
    assert isinstance(backend, Backend)
    assert backend.family.name == "sd2" and backend.text_width == 32
    assert backend.schedule.parameterization == "v" and backend.family.latent_channels == 4


@pytest.mark.parametrize("fixture", ["forge", "forge_sd1"])
@pytest.mark.parametrize(
    "settings", [{}, {"emphasis": "No norm"}, {"emphasis": "None"}, {"CLIP_stop_at_last_layers": 2}]
)
def test_conditioning_equals_forges_at_generation_time(fixture, settings, request):
    """The run's conditioning with the vectors injected equals what Forge's engine computes at generation
    time for the same prompts with an embedding holding those vectors; other vectors give another result."""
    from modules import shared

    forge = request.getfixturevalue(fixture)
    shared.opts.data.update(settings)
    backend = backend_for(forge)
    vectors = backend.token_vectors("green circle") + 0.1  # not a word's own: the injection must place them
    registered(forge, vectors)
    backend.prompt_encoder.chunker.register(NAME, vectors.shape[0])
    with torch.no_grad():
        ours = backend.prompt_encoder(PROMPTS, {NAME: vectors})
        other = backend.prompt_encoder(PROMPTS, {NAME: vectors.flip(0)})
    forges = generation_conditioning(forge, PROMPTS)
    assert ours.shape == forges.shape and ours.shape[1] == 77 * 2  # the long prompt takes two chunks
    torch.testing.assert_close(ours, forges, rtol=0, atol=1e-6)
    assert not torch.allclose(other, forges, atol=1e-4), (
        "the negative control matched: the test proves nothing"
    )


def test_the_engines_clip_skip_is_used_and_left_as_found(forge):
    from modules import shared

    shared.opts.data["CLIP_stop_at_last_layers"] = 2
    backend = backend_for(forge)
    forge.engine.clip_skip = 1
    with torch.no_grad():
        skipped = backend.prompt_encoder(["a red square"], {})
    assert forge.engine.clip_skip == 1
    shared.opts.data["CLIP_stop_at_last_layers"] = 1
    with torch.no_grad():
        last = backend_for(forge).prompt_encoder(["a red square"], {})
    assert not torch.allclose(skipped, last)


def one_step(backend, vectors, batch=1):
    backend.prompt_encoder.chunker.register(NAME, vectors.shape[0])
    cond = backend.prompt_encoder([f"a photo of {NAME}"] * batch, {NAME: vectors})
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prediction = backend.predict(latents, torch.tensor([500] * batch), cond)
    prediction.float().pow(2).mean().backward()


def test_both_traps_are_real_on_the_stand_in_and_the_session_gets_past_them(forge):
    """Forge's weights are inference tensors (loaded in inference mode), and its transformer block adds in
    place: outside a training session a backward pass fails on each; inside, the vectors get a gradient."""
    from backend.nn.unet import BasicTransformerBlock

    backend = backend_for(forge)
    vectors = backend.token_vectors("red circle").requires_grad_(True)
    assert next(backend.loan.unet.parameters()).is_inference()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        one_step(backend, vectors)
    from ti_trainer.backends.forge_memory import TrainableWeights

    with TrainableWeights([backend.loan.unet_patcher.model, backend.loan.clip.cond_stage_model]):
        assert any(isinstance(m, BasicTransformerBlock) for m in backend.loan.unet.modules())
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            one_step(backend, vectors)
    vectors.grad = None
    with backend.training_session():
        one_step(backend, vectors)
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0


def test_a_step_asks_forge_for_unet_and_text_encoder_with_room_for_the_backward(forge, monkeypatch):
    from backend import memory_management

    calls = recorded_loads(monkeypatch)
    backend = backend_for(forge)
    budget = memory_management.current_inference_memory
    vectors = backend.token_vectors("red circle").requires_grad_(True)
    with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing="off")):
        one_step(backend, vectors, batch=2)
        asked = [
            memory
            for models, memory in calls
            if models == [backend.loan.unet_patcher, backend.loan.clip.patcher]
        ]
        assert asked, f"never asked for UNet and text encoder together: {calls}"
        forward_only = backend.loan.unet_patcher.memory_required([2, 4, 8, 8])
        assert max(asked) >= 2 * forward_only  # room for the activations the backward pass keeps
        assert memory_management.current_inference_memory == budget  # Forge's GPU-weights budget untouched
        count = len(calls)
        one_step(backend, vectors, batch=2)
        assert len(calls) == count, "asked again although nothing displaced the models"
        with backend.previewing():
            pass
        one_step(backend, vectors, batch=2)
        assert len(calls) == count + 1, "not asked again after a preview had the GPU"


MIB = 1024 * 1024


def unet_and_text_encoder_asks(backend, calls) -> list:
    wanted = [backend.loan.unet_patcher, backend.loan.clip.patcher]
    return [memory for models, memory in calls if models == wanted]


def test_the_room_asked_for_a_step_is_the_estimates_made_once_per_shape_and_plan(forge, monkeypatch):
    """The host's estimate of what a step needs beyond the weights is what Forge is asked to keep free; it is
    made once per (plan, latent shape), never per step; the largest asked so far stands."""
    calls = recorded_loads(monkeypatch)
    estimated = []

    def step_memory(plan, latent_shape, backend):
        estimated.append((plan.checkpointing, latent_shape, backend))
        return {"off": 7, "all": 3}[plan.checkpointing] * MIB * latent_shape[0]

    backend = backend_for(forge, step_memory)
    vectors = backend.token_vectors("red circle").requires_grad_(True)
    with backend.training_session():
        with backend.memory_levers(MemoryPlan(checkpointing="off")):
            for batch in (2, 2, 1, 2):
                one_step(backend, vectors, batch=batch)
        assert unet_and_text_encoder_asks(backend, calls) == [0, 14 * MIB]  # the text encoders run first
        assert estimated == [("off", (2, 4, 8, 8), backend), ("off", (1, 4, 8, 8), backend)]
        calls.clear()
        with backend.memory_levers(MemoryPlan(checkpointing="all")):
            one_step(backend, vectors, batch=2)
            one_step(backend, vectors, batch=2)
        assert unet_and_text_encoder_asks(backend, calls) == [0, 6 * MIB]
        with backend.memory_levers(MemoryPlan(checkpointing="off")):  # known already: not estimated again
            one_step(backend, vectors, batch=2)
    assert [level for level, _, _ in estimated] == ["off", "off", "all"]
    forward = backend.loan.unet_patcher.memory_required([2, 4, 8, 8])
    assert backward_bytes(forward, "off") != 14 * MIB  # the factor would have asked otherwise


def test_where_the_estimate_fails_the_room_is_forges_forward_estimate_times_the_factor(forge, monkeypatch):
    calls = recorded_loads(monkeypatch)
    attempts = []

    def failing(plan, latent_shape, backend):
        attempts.append(latent_shape)
        raise RuntimeError("no estimate for this model")

    backend = backend_for(forge, failing)
    vectors = backend.token_vectors("red circle").requires_grad_(True)
    with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing="high-res")):
        one_step(backend, vectors, batch=2)
        one_step(backend, vectors, batch=2)
    forward = backend.loan.unet_patcher.memory_required([2, 4, 8, 8])
    assert unet_and_text_encoder_asks(backend, calls) == [0, backward_bytes(forward, "high-res")]
    assert attempts == [(2, 4, 8, 8)]  # the fallback is kept too: a failing estimate is not retried per step
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0


def test_the_host_sizes_the_room_with_the_vram_estimate(forge, monkeypatch):
    """host/forge.py hands its backends the VRAM estimate's room (vram/for_config.py `step_room_bytes`); the
    tiny model is no architecture the estimate knows, so it is stood in for here."""
    from ti_trainer.host import forge as forge_host
    from ti_trainer.vram import for_config

    asked_of_vram = []

    def room(plan, latent_shape, backend):
        asked_of_vram.append((plan.checkpointing, latent_shape))
        return 5 * MIB

    monkeypatch.setattr(for_config, "step_room_bytes", room)
    calls = recorded_loads(monkeypatch)
    backend = forge_host.get_backend()
    vectors = backend.token_vectors("red circle").requires_grad_(True)
    with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing="all")):
        one_step(backend, vectors)
    assert asked_of_vram == [("all", (1, 4, 8, 8))]
    assert unet_and_text_encoder_asks(backend, calls) == [0, 5 * MIB]


def test_the_memory_line_says_what_is_the_trainers_and_what_is_forges(forge, monkeypatch):
    """Checkpointing and the precision computed in are the trainer's; attention, the weights' dtype and
    their placement stay Forge's, and the line says so with Forge's own settings."""
    from backend import memory_management

    backend = backend_for(forge)
    kmodel = backend.loan.unet_patcher.model
    monkeypatch.setattr(kmodel, "computation_dtype", torch.bfloat16)
    monkeypatch.setattr(kmodel, "storage_dtype", torch.float16)
    monkeypatch.setattr(memory_management, "vram_state", memory_management.VRAMState.NORMAL_VRAM)
    monkeypatch.setattr(memory_management, "total_vram", 8192.0)
    monkeypatch.setattr(memory_management, "current_inference_memory", 2048 * MIB)
    plan = MemoryPlan(
        attention="xformers", checkpointing="all", vae_offload=True, precision="bf16", half_weights=True
    )
    assert backend.describe_memory(plan) == (
        "checkpointing of every UNet block, bf16 (Forge's computation dtype); attention, weight storage and "
        "placement are Forge's: UNet weights in fp16, GPU Weights 6144 of 8192 MB (weights beyond it wait in "
        "RAM and are copied to the GPU as each layer computes)"
    )
    monkeypatch.setattr(memory_management, "ALWAYS_VRAM_OFFLOAD", True)
    fp32 = backend.describe_memory(MemoryPlan(checkpointing="off", precision="fp32"))
    assert fp32.startswith("checkpointing off, fp32 (the UNet computing in Forge's bf16); ")
    assert fp32.endswith(", other models unloaded whenever one loads")


def test_the_runs_memory_line_is_the_backends_own(forge):
    """On the stand-in (Forge's --always-cpu) the run's line names Forge's CPU placement, and none of the
    plan's levers Forge keeps (its attention, the VAE's place, the weights' dtype)."""
    from ti_trainer.training import fit

    backend = backend_for(forge)
    data = SimpleNamespace(images=[SimpleNamespace(size=(8, 8))], batch_size=1, gradient_accumulation=1)
    plan = MemoryPlan(attention="sdpa", checkpointing="high-res", vae_offload=True, precision="fp32")
    said = []
    with fit.memory_for_training(
        plan,
        backend,
        data,
        1,
        auto_checkpointing=False,
        say=said.append,
        probe_first=False,
        say_estimate=False,
    ):
        pass
    assert said == [
        "Memory: checkpointing of the high-resolution UNet blocks, fp32 (Forge's computation dtype); attention, "
        "weight storage and placement are Forge's: UNet weights in fp32, everything on the CPU"
    ]
    assert plan.describe() not in said[0] and "SDPA" not in said[0] and "VAE" not in said[0]


def run_session(backend, body):
    with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing="all")):
        body()


@pytest.mark.parametrize("ending", ["success", "error"])
def test_the_model_and_forges_memory_come_back_as_found(forge, ending):
    """Weights bit for bit the same inference tensors over the same storage, flags as found, no lever left,
    and the models Forge had loaded (only the VAE here) loaded again, in order, with nothing else."""
    from backend import memory_management

    memory_management.load_models_gpu([forge.model.forge_objects.vae.patcher])
    found_memory = memory_state()
    before = model_fingerprint(forge.model)
    backend = backend_for(forge)
    vectors = backend.token_vectors("red circle").requires_grad_(True)

    def body():
        one_step(backend, vectors)
        assert not next(backend.loan.unet.parameters()).is_inference()  # trainable while the run lasts
        assert forge.model.forge_objects.unet in memory_state()[0]
        if ending == "error":
            raise RuntimeError("boom")

    if ending == "error":
        with pytest.raises(RuntimeError, match="boom"):
            run_session(backend, body)
    else:
        run_session(backend, body)
    assert vectors.grad is not None
    assert memory_state() == found_memory
    assert_same_fingerprint(before, model_fingerprint(forge.model))
    assert forge.engine.embeddings.fixes == []
    with torch.inference_mode():  # and Forge can still generate
        assert torch.isfinite(forge.model.get_learned_conditioning(["a cat"])).all()


def test_a_weight_forge_re_creates_mid_run_is_made_trainable_again_and_given_back(forge):
    """A preview's loads run in inference mode and may re-create weights as inference tensors."""
    backend = backend_for(forge)
    vectors = backend.token_vectors("red circle").requires_grad_(True)
    linear = backend.loan.unet.out[2]
    with backend.training_session():
        one_step(backend, vectors)
        with backend.previewing(), torch.inference_mode():
            linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        assert linear.weight.is_inference()
        one_step(backend, vectors)
    assert linear.weight.is_inference()


def test_checkpointing_levels_train_and_leave_no_lever(forge):
    backend = backend_for(forge)
    before = model_fingerprint(forge.model)
    grads = {}
    for level in ("off", "high-res", "all"):
        vectors = backend.token_vectors("red circle").requires_grad_(True)
        with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing=level)):
            one_step(backend, vectors)
        grads[level] = vectors.grad
    torch.testing.assert_close(grads["off"], grads["all"])
    torch.testing.assert_close(grads["off"], grads["high-res"])
    assert_same_fingerprint(before, model_fingerprint(forge.model))


def test_images_encode_to_forges_scaled_latent_distribution(forge):
    backend = backend_for(forge)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = backend.encode_images(pixels)
    assert latents.mean.shape == (1, 4, 8, 8) and (latents.std > 0).all()
    vae = forge.model.forge_objects.vae
    with torch.inference_mode():
        vae.patcher.model_options["model_vae_regulation"] = lambda posterior: posterior.mode()
        forges = forge.model.encode_first_stage(pixels)
    torch.testing.assert_close(latents.mean, forges, rtol=1e-5, atol=1e-5)


def test_models_it_cannot_train_are_refused_with_a_message(forge):
    from backend import memory_management

    class SDXL:
        is_sdxl = True
        forge_objects = object()

    with pytest.raises(ValueError, match="ForgeXLBackend"):  # host/forge.py picks that one for SDXL
        ForgeBackend(SDXL(), memory_management)
    forge.model.is_inpaint = True
    with pytest.raises(UserError, match="inpainting"):
        backend_for(forge)


def test_parts_are_forges_own_objects_not_copies(forge):
    backend = backend_for(forge)
    parts = model_parts(forge.model)
    assert (
        backend.loan.unet_patcher.model is parts["unet"]
        and backend.loan.clip.cond_stage_model is parts["text"]
    )
    assert backend.loan.vae.first_stage_model is parts["vae"]
