"""The Forge SDXL backend on the stand-in's tiny SDXL: conditioning (crossattn and vector) equal to Forge's at
generation time, the gradient reaching both encoders' vectors through Forge's two engines, and the model,
Forge's memory manager and the engines' embedding databases given back as found."""

import types

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
from ti_trainer.backends.forge_xl_backend import ForgeXLBackend
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import MemoryPlan

NAME = "xtoken"
PROMPTS = [
    f"a photo of {NAME}",
    f"(a photo:1.3) of [{NAME}] in green stripes",
    f"a red square BREAK {NAME} in green",
    ", ".join(["a red square"] * 30) + f", {NAME} at the end",
]
HEIGHT, WIDTH = 96, 64  # not Forge's 1024 default: the prompt object's size must reach the vector


def backend_for(forge, step_memory=None) -> ForgeXLBackend:
    from backend import memory_management
    from modules import shared

    opts = shared.opts
    return ForgeXLBackend(
        forge.model,
        memory_management,
        emphasis=opts.emphasis,
        clip_skip=opts.CLIP_stop_at_last_layers,
        crop_top_left=(opts.sdxl_crop_top, opts.sdxl_crop_left),
        step_memory=step_memory,
    )


def registered(forge, vectors: dict):
    """`vectors` as an SDXL embedding in both engines' databases, as Forge's loader makes one of a file."""
    from backend.text_processing.textual_inversion import Embedding

    embedding = Embedding({key: value.clone() for key, value in vectors.items()}, NAME)
    embedding.vectors = vectors["clip_g"].shape[0]
    embedding.shape = vectors["clip_g"].shape[1] + vectors["clip_l"].shape[1]
    for engine in forge.engines:
        engine.embeddings.register_embedding(embedding)


def generation_conditioning(forge, prompts, height=HEIGHT, width=WIDTH):
    """What Forge's txt2img computes: clip skip from the settings, prompts carrying the image's size."""
    from modules import shared
    from modules.prompt_parser import SdConditioning

    forge.model.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
    return forge.model.get_learned_conditioning(SdConditioning(prompts, width=width, height=height))


def ours(backend, prompts, vectors, height=HEIGHT, width=WIDTH) -> dict:
    with torch.no_grad():
        return backend.unet_conditioning(backend.prompt_encoder(prompts, {NAME: vectors}), height, width)


def trial_vectors(backend) -> dict:
    """Not a word's own vectors: the injection must place them."""
    return {key: value + 0.1 for key, value in backend.token_vectors("green circle").items()}


def test_it_has_every_member_of_the_contract(forge_xl):
    backend = backend_for(forge_xl)
    assert isinstance(backend, Backend)
    assert backend.family.name == "sdxl" and backend.text_width == 80
    assert [(spec.key, spec.width) for spec in backend.family.text_encoders] == [
        ("clip_l", 32),
        ("clip_g", 48),
    ]
    assert backend.schedule.parameterization == "eps" and backend.family.vae_scale_factor == 8
    vectors = backend.token_vectors("red circle")
    assert vectors["clip_l"].shape == (2, 32) and vectors["clip_g"].shape == (2, 48)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"emphasis": "No norm"},
        {"CLIP_stop_at_last_layers": 3},
        {"sdxl_crop_top": 16, "sdxl_crop_left": 8},
    ],
)
def test_conditioning_equals_forges_at_generation_time(forge_xl, settings):
    """crossattn and vector with the vectors injected equal what Forge's SDXL computes for the same prompts
    at the same image size with an embedding holding those vectors in both engines."""
    from modules import shared

    shared.opts.data.update(settings)
    backend = backend_for(forge_xl)
    vectors = trial_vectors(backend)
    registered(forge_xl, vectors)
    backend.prompt_encoder.chunker.register(NAME, 2)
    forges = generation_conditioning(forge_xl, PROMPTS)
    mine = ours(backend, PROMPTS, vectors)
    assert (
        mine["crossattn"].shape == forges["crossattn"].shape == (4, 77 * 2, 80)
    )  # the long prompt: 2 chunks
    assert mine["vector"].shape == forges["vector"].shape == (4, 48 + 6 * 256)
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(mine[key], forges[key], rtol=0, atol=1e-6)


def test_each_encoder_takes_its_own_part_and_the_size_reaches_the_vector(forge_xl):
    """Negative controls of the parity test: each encoder's part of the vectors changes only its own
    columns (clip_g's the pooled text too), and another image size changes only the size embedding."""
    backend = backend_for(forge_xl)
    vectors = trial_vectors(backend)
    registered(forge_xl, vectors)
    backend.prompt_encoder.chunker.register(NAME, 2)
    forges = generation_conditioning(forge_xl, PROMPTS[:1])

    other_l = ours(backend, PROMPTS[:1], {**vectors, "clip_l": vectors["clip_l"].flip(0)})
    assert not torch.allclose(other_l["crossattn"][..., :32], forges["crossattn"][..., :32], atol=1e-4)
    torch.testing.assert_close(other_l["crossattn"][..., 32:], forges["crossattn"][..., 32:])
    torch.testing.assert_close(other_l["vector"], forges["vector"])  # CLIP-L has no pooled output in SDXL

    other_g = ours(backend, PROMPTS[:1], {**vectors, "clip_g": vectors["clip_g"].flip(0)})
    torch.testing.assert_close(other_g["crossattn"][..., :32], forges["crossattn"][..., :32])
    assert not torch.allclose(other_g["crossattn"][..., 32:], forges["crossattn"][..., 32:], atol=1e-4)
    assert not torch.allclose(other_g["vector"][:, :48], forges["vector"][:, :48], atol=1e-4)

    taller = ours(backend, PROMPTS[:1], vectors, height=HEIGHT * 2)
    torch.testing.assert_close(taller["crossattn"], forges["crossattn"])
    torch.testing.assert_close(taller["vector"][:, :48], forges["vector"][:, :48])
    assert not torch.allclose(taller["vector"][:, 48:], forges["vector"][:, 48:], atol=1e-4)
    torch.testing.assert_close(
        taller["vector"], generation_conditioning(forge_xl, PROMPTS[:1], height=HEIGHT * 2)["vector"]
    )


def test_the_engines_clip_skip_is_used_and_left_as_found(forge_xl):
    from modules import shared

    shared.opts.data["CLIP_stop_at_last_layers"] = 3
    backend = backend_for(forge_xl)
    for engine in forge_xl.engines:
        engine.clip_skip = 2
    with torch.no_grad():
        skipped = backend.prompt_encoder(["a red square"], {})
    assert [engine.clip_skip for engine in forge_xl.engines] == [2, 2]
    shared.opts.data["CLIP_stop_at_last_layers"] = 1
    with torch.no_grad():
        penultimate = backend_for(forge_xl).prompt_encoder(["a red square"], {})
    assert not torch.allclose(skipped.hidden, penultimate.hidden)
    torch.testing.assert_close(skipped.pooled, penultimate.pooled)  # the pooled output is the last layer's


def one_step(backend, vectors, batch=1):
    backend.prompt_encoder.chunker.register(NAME, 2)
    cond = backend.prompt_encoder([f"a photo of {NAME}"] * batch, {NAME: vectors})
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prediction = backend.predict(latents, torch.tensor([500] * batch), cond)
    prediction.float().pow(2).mean().backward()


def trainable(backend) -> dict:
    return {key: value.requires_grad_(True) for key, value in backend.token_vectors("red circle").items()}


def test_the_gradient_reaches_both_encoders_vectors_and_the_pooled_path(forge_xl):
    """Outside a session Forge's inference-mode weights refuse the backward pass; inside, both encoders'
    vectors learn, clip_g's through the pooled text in the UNet's vector input as well."""
    backend = backend_for(forge_xl)
    vectors = trainable(backend)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        one_step(backend, vectors)
    for tensor in vectors.values():
        tensor.grad = None
    with backend.training_session():
        one_step(backend, vectors)
    assert all(tensor.grad is not None and tensor.grad.abs().sum() > 0 for tensor in vectors.values())

    pooled_only = trainable(backend)
    with backend.training_session():
        cond = backend.prompt_encoder([f"a photo of {NAME}"], {NAME: pooled_only})
        backend.unet_conditioning(cond, 64, 64)["vector"].sum().backward()
    assert pooled_only["clip_g"].grad.abs().sum() > 0 and pooled_only["clip_l"].grad is None


def test_a_step_asks_forge_for_unet_and_both_text_encoders_with_room_for_the_backward(forge_xl, monkeypatch):

    calls = recorded_loads(monkeypatch)
    backend = backend_for(forge_xl)
    with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing="off")):
        one_step(backend, trainable(backend), batch=2)
    asked = [
        memory for models, memory in calls if models == [backend.loan.unet_patcher, backend.loan.clip.patcher]
    ]
    assert asked and max(asked) >= 2 * backend.loan.unet_patcher.memory_required([2, 4, 8, 8])
    assert set(backend.loan.clip.cond_stage_model.children()) == {
        engine.text_encoder for engine in forge_xl.engines
    }  # the one patcher holds both text encoders


def test_the_room_asked_for_an_sdxl_step_is_the_estimates_and_its_line_says_what_is_forges(
    forge_xl, monkeypatch
):
    """As for SD (tests/forge/test_forge_backend.py): the host's estimate, once per (plan, shape), for the
    UNet and both text encoders; and the memory line names what stays Forge's."""
    calls = recorded_loads(monkeypatch)
    estimated = []

    def step_memory(plan, latent_shape, backend):
        estimated.append((plan.checkpointing, latent_shape))
        return 9 * 1024 * 1024 * latent_shape[0]

    backend = backend_for(forge_xl, step_memory)
    plan = MemoryPlan(checkpointing="high-res")
    with backend.training_session(), backend.memory_levers(plan):
        one_step(backend, trainable(backend), batch=2)
        one_step(backend, trainable(backend), batch=2)
    asked = [
        memory for models, memory in calls if models == [backend.loan.unet_patcher, backend.loan.clip.patcher]
    ]
    assert asked == [0, 18 * 1024 * 1024] and estimated == [("high-res", (2, 4, 8, 8))]
    line = backend.describe_memory(plan)
    assert line.startswith(
        "checkpointing of the high-resolution UNet blocks, fp32 (Forge's computation dtype); "
    )
    assert "attention, weight storage and placement are Forge's: UNet weights in fp32" in line


def database_state(forge) -> list:
    return [
        (dict(db.word_embeddings), {k: list(v) for k, v in db.ids_lookup.items()}, db.fixes)
        for db in (engine.embeddings for engine in forge.engines)
    ]


@pytest.mark.parametrize("ending", ["success", "error"])
def test_the_model_forges_memory_and_databases_come_back_as_found(forge_xl, ending):
    """Every weight and buffer bit for bit the same inference tensor over the same storage, on its device in
    its dtype; flags as found; no lever left; Forge's loaded models as they were; both databases untouched."""
    from backend import memory_management

    memory_management.load_models_gpu([forge_xl.model.forge_objects.vae.patcher])
    found_memory = memory_state()
    before = model_fingerprint(forge_xl.model)
    databases = database_state(forge_xl)
    backend = backend_for(forge_xl)
    vectors = trainable(backend)

    def body():
        one_step(backend, vectors)
        assert not next(backend.loan.unet.parameters()).is_inference()  # trainable while the run lasts
        if ending == "error":
            raise RuntimeError("boom")

    with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing="all")):
        if ending == "error":
            with pytest.raises(RuntimeError, match="boom"):
                body()
        else:
            body()
    assert all(tensor.grad is not None for tensor in vectors.values())
    assert memory_state() == found_memory
    assert_same_fingerprint(before, model_fingerprint(forge_xl.model))
    assert database_state(forge_xl) == databases
    with torch.inference_mode():  # and Forge can still generate
        assert torch.isfinite(generation_conditioning(forge_xl, ["a cat"])["vector"]).all()


def test_checkpointing_levels_give_the_same_gradients(forge_xl):
    backend = backend_for(forge_xl)
    grads = {}
    for level in ("off", "high-res", "all"):
        vectors = trainable(backend)
        with backend.training_session(), backend.memory_levers(MemoryPlan(checkpointing=level)):
            one_step(backend, vectors)
        grads[level] = vectors
    for level in ("high-res", "all"):
        for key in ("clip_l", "clip_g"):
            torch.testing.assert_close(grads["off"][key].grad, grads[level][key].grad)


def test_images_encode_to_forges_scaled_latent_distribution(forge_xl):
    backend = backend_for(forge_xl)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    latents = backend.encode_images(pixels)
    assert latents.mean.shape == (1, 4, 8, 8) and (latents.std > 0).all()
    vae = forge_xl.model.forge_objects.vae
    assert vae.first_stage_model.scaling_factor == 0.13025
    with torch.inference_mode():
        vae.patcher.model_options["model_vae_regulation"] = lambda posterior: posterior.mode()
        forges = forge_xl.model.encode_first_stage(pixels)
    torch.testing.assert_close(latents.mean, forges, rtol=1e-5, atol=1e-5)


def test_the_refiner_inpainting_and_other_families_are_refused(forge_xl):
    from backend import memory_management

    model = forge_xl.model
    refiner = types.SimpleNamespace(  # Forge's StableDiffusionXLRefiner: bigG's engine only
        is_sdxl=True,
        forge_objects=model.forge_objects,
        forge_objects_original=model.forge_objects_original,
        text_processing_engine_g=model.text_processing_engine_g,
    )
    with pytest.raises(UserError, match="refiner"):
        ForgeXLBackend(refiner, memory_management)
    sd = types.SimpleNamespace(
        is_sdxl=False, forge_objects=model.forge_objects
    )  # host/forge.py: ForgeBackend
    with pytest.raises(ValueError, match="ForgeBackend"):
        ForgeXLBackend(sd, memory_management)
    model.is_inpaint = True
    with pytest.raises(UserError, match="inpainting"):
        backend_for(forge_xl)


def test_parts_are_forges_own_objects_not_copies(forge_xl):
    backend = backend_for(forge_xl)
    parts = model_parts(forge_xl.model)
    assert (
        backend.loan.unet_patcher.model is parts["unet"]
        and backend.loan.clip.cond_stage_model is parts["text"]
    )
    assert backend.loan.vae.first_stage_model is parts["vae"]
    assert list(backend.text_engines.values()) == forge_xl.engines
