"""The WebUI's SDXL trained in place (backends/sgm_backend.py through host/a1111.py) on the stand-in's tiny sgm
SDXL: conditioning equal to the WebUI's generation path, only the embedding learning (through both encoders),
runs through the host that leave the model exactly as found (also under --medvram-sdxl and with FP8 weight
storage), previews through its txt2img with the run's vectors, and the result in the WebUI's database."""

import contextlib
import dataclasses
import types

import numpy as np
import pytest
import safetensors.torch
import torch
from model_state import assert_same_fingerprint, model_fingerprint
from PIL import Image
from quick_runs import quick_train_config
from test_ldm_memory import pre_hooks
from tiny_sgm import BIGG_WIDTH, CLIP_L_WIDTH, CROSSATTN_WIDTH, FP8_RUNS_ON_CPU

from ti_trainer.backends.contract import Backend
from ti_trainer.backends.ldm_memory import lowvram_hooks
from ti_trainer.backends.sgm_backend import SgmBackend
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.errors import UserError
from ti_trainer.host import a1111
from ti_trainer.host.jobs import JobRegistry
from ti_trainer.training.loop import TrainingHooks, train

NAME = "xlemb"
MEDVRAM_SDXL = {"flags": {"medvram_sdxl": True}}
FP8_FOR_SDXL = {"settings": {"fp8_storage": "Enable for SDXL"}}
PROMPTS = [
    "a photo of a red cat",
    "a (photo:1.4) of a [red] cat, ((sharp))",
    "a cat BREAK on a red sofa",
    " ".join(["cat"] * 70) + ", a red sofa, " + " ".join(["dog"] * 40),  # two chunks, comma back-tracking
]


def webui_conditioning(model, prompt, width, height):
    from modules.prompt_parser import SdConditioning

    with torch.no_grad():
        return model.get_learned_conditioning(SdConditioning([prompt], width=width, height=height))


def our_conditioning(backend, prompt, width, height, vectors=None):
    with torch.no_grad():
        text = backend.prompt_encoder([prompt], vectors or {})
        return backend.unet_conditioning(text, height, width)


def assert_same_conditioning(ours, theirs):
    assert ours.keys() == theirs.keys() == {"crossattn", "vector"}
    for key in ours:
        assert ours[key].shape == theirs[key].shape, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)


def random_vectors(seed=0, rows=2):
    generator = torch.Generator().manual_seed(seed)
    return {
        "clip_l": torch.randn(rows, CLIP_L_WIDTH, generator=generator),
        "clip_g": torch.randn(rows, BIGG_WIDTH, generator=generator),
    }


def write_sdxl_embedding(folder, name, vectors):
    safetensors.torch.save_file(
        {key: value.contiguous() for key, value in vectors.items()}, folder / f"{name}.safetensors"
    )


# --- the backend and its conditioning ---------------------------------------------------------------------------


def test_the_host_gives_an_sdxl_backend_with_the_contract_and_the_models_family(webui_sdxl):
    backend = a1111.get_backend()
    assert isinstance(backend, SgmBackend) and isinstance(backend, Backend)
    assert backend.family.name == "sdxl" and backend.family.vectors_per_encoder
    assert [(s.key, s.width) for s in backend.family.text_encoders] == [("clip_l", 32), ("clip_g", 48)]
    assert backend.text_width == CROSSATTN_WIDTH
    assert backend.schedule.parameterization == "eps"
    torch.testing.assert_close(
        backend.schedule.alphas_cumprod.float(), webui_sdxl.model.alphas_cumprod.float()
    )
    embedders = webui_sdxl.model.conditioner.embedders
    assert (
        backend.token_embedding_weight("clip_l")
        is embedders[0].wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight
    )
    assert (
        backend.token_embedding_weight("clip_g") is embedders[1].wrapped.model.token_embedding.wrapped.weight
    )
    assert backend.model_hash == "a3b1c2d4e5" and backend.model_name == "tiny-sdxl"


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_conditioning_equals_the_webuis_generation_conditioning(webui_sdxl, prompt, size):
    backend = a1111.get_backend()
    width, height = size
    assert_same_conditioning(
        our_conditioning(backend, prompt, width, height),
        webui_conditioning(webui_sdxl.model, prompt, width, height),
    )


def test_the_vectors_go_where_the_webui_puts_a_loaded_embedding_and_a_change_shows(webui_sdxl):
    model, vectors = webui_sdxl.model, random_vectors()
    write_sdxl_embedding(webui_sdxl.embeddings_dir, NAME, vectors)
    webui_sdxl.db.load_textual_inversion_embeddings(force_reload=True)
    backend = a1111.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 2)
    prompt = f"a (photo:1.2) of {NAME} on a sofa"
    theirs = webui_conditioning(model, prompt, 64, 64)
    assert_same_conditioning(our_conditioning(backend, prompt, 64, 64, {NAME: vectors}), theirs)
    # Negative controls: other vectors in either encoder, or another image size, give another conditioning.
    for key in ("clip_l", "clip_g"):
        changed = {**vectors, key: vectors[key] + torch.randn(vectors[key].shape)}
        ours = our_conditioning(backend, prompt, 64, 64, {NAME: changed})
        assert not torch.allclose(ours["crossattn"], theirs["crossattn"], atol=1e-3)
    other_size = our_conditioning(backend, prompt, 128, 64, {NAME: vectors})
    assert not torch.allclose(other_size["vector"], theirs["vector"], atol=1e-3)


def test_the_webuis_text_settings_are_followed(webui_sdxl, monkeypatch):
    from modules import shared

    for option, value in [
        ("sdxl_clip_l_skip", True),
        ("CLIP_stop_at_last_layers", 1),
        ("sdxl_crop_top", 3),
        ("sdxl_crop_left", 5),
        ("emphasis", "No norm"),
    ]:
        monkeypatch.setitem(shared.opts.data, option, value)
    prompt = "a (photo:1.4) of a red cat"
    theirs = webui_conditioning(webui_sdxl.model, prompt, 96, 64)
    assert_same_conditioning(our_conditioning(a1111.get_backend(), prompt, 96, 64), theirs)
    monkeypatch.setitem(shared.opts.data, "sdxl_clip_l_skip", False)
    defaults = our_conditioning(a1111.get_backend(), prompt, 96, 64)
    assert not torch.allclose(defaults["crossattn"], theirs["crossattn"], atol=1e-3)


def test_predict_is_the_unet_on_the_webuis_conditioning_at_the_latents_size(webui_sdxl):
    model, backend = webui_sdxl.model, a1111.get_backend()
    latents, timesteps = torch.randn(1, 4, 8, 12), torch.tensor([500])
    with torch.no_grad():
        ours = backend.predict(latents, timesteps, backend.prompt_encoder(["a red cat"], {}))
        theirs = model.apply_model(latents, timesteps, webui_conditioning(model, "a red cat", 96, 64))
        other_size = model.apply_model(latents, timesteps, webui_conditioning(model, "a red cat", 64, 64))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, other_size, atol=1e-4)


def test_images_encode_to_the_vaes_distribution_scaled_once(webui_sdxl):
    from ldm.models.autoencoder import AutoencoderKL

    model, backend = webui_sdxl.model, a1111.get_backend()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    dist = backend.encode_images(pixels)
    with torch.no_grad():
        posterior = AutoencoderKL.encode(model.first_stage_model, pixels)  # the distribution sgm samples from
    torch.testing.assert_close(dist.mean, posterior.mean * 0.13025)
    torch.testing.assert_close(dist.std, posterior.std * 0.13025)
    assert dist.mean.shape == (2, 4, 8, 8) and dist.mean.dtype == torch.float32


def test_only_the_embedding_learns_through_both_encoders_and_the_model_is_left_as_found(webui_sdxl):
    model, backend = webui_sdxl.model, a1111.get_backend()
    before = model_fingerprint(model)
    vectors = {key: value.requires_grad_() for key, value in random_vectors().items()}
    backend.prompt_encoder.chunker.register(NAME, 2)
    with backend.training_session():
        cond = backend.prompt_encoder([f"a photo of {NAME}"], {NAME: vectors})
        prediction = backend.predict(torch.randn(1, 4, 8, 8), torch.tensor([300]), cond)
        prediction.square().mean().backward()
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert vectors["clip_l"].grad.abs().sum() > 0 and vectors["clip_g"].grad.abs().sum() > 0
    assert_same_fingerprint(before, model_fingerprint(model))


def test_training_session_restores_flags_gradients_and_the_token_embedding_wrappers(webui_sdxl):
    model, backend = webui_sdxl.model, a1111.get_backend()
    unet_weight = next(model.model.parameters())
    unet_weight.requires_grad_(True)
    unet_weight.grad = torch.ones_like(unet_weight)
    model.model.train()
    bigg = model.conditioner.embedders[1].wrapped.model
    wrapper = bigg.token_embedding
    try:
        with backend.training_session(), backend.training_session():
            assert not unet_weight.requires_grad
            bigg.token_embedding = torch.nn.Identity()  # as if something broke mid-run
        assert unet_weight.requires_grad and unet_weight.grad is not None and model.model.training
        assert bigg.token_embedding is wrapper
    finally:
        unet_weight.requires_grad_(False)
        unet_weight.grad = None
        model.model.eval()


def test_an_inpainting_or_one_encoder_sdxl_is_refused_with_a_message(webui_sdxl, monkeypatch):
    monkeypatch.setattr(webui_sdxl.model, "is_sdxl_inpaint", True)
    with pytest.raises(UserError, match="inpainting"):
        a1111.get_backend()
    # A refiner's conditioner holds bigG alone (stood for here by a model holding the real wrapper only).
    refiner = types.SimpleNamespace(
        conditioner=types.SimpleNamespace(embedders=[webui_sdxl.model.conditioner.embedders[1]]),
        parameterization="eps",
    )
    with pytest.raises(UserError, match="refiner"):
        SgmBackend(refiner, "cpu")


# --- training through the host ----------------------------------------------------------------------------------


def ready_to_train(webui):
    """Three captioned images and an embedding created the WebUI's way, in `webui`'s folders."""
    rng = np.random.default_rng(0)
    for index, caption in enumerate(["a red square", "a blue circle", "green stripes"]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            webui.data_dir / f"{index}.png"
        )
        (webui.data_dir / f"{index}.txt").write_text(caption, encoding="utf-8")
    services = a1111.host_services()
    path = create_embedding(services.get_backend(), NAME, "a cat", 2, services.embeddings_dir)
    services.refresh_embeddings()
    assert path == webui.embeddings_dir / f"{NAME}.safetensors" and NAME in webui.db.word_embeddings
    return webui, services


@pytest.fixture
def sdxl_run(webui_sdxl):
    return ready_to_train(webui_sdxl)


@pytest.fixture
def fresh_sdxl_run(fresh_sdxl_webui):
    """As sdxl_run, on an SDXL of its own set up as the test's parametrization of fresh_sdxl_webui asks."""
    return ready_to_train(fresh_sdxl_webui)


def config_for(webui, services, **changes):
    settings = dict(
        embedding_name=NAME,
        data_dir=str(webui.data_dir),
        embeddings_dir=str(services.embeddings_dir),
        templates_dirs=[str(folder) for folder in services.templates_dirs],
        log_dir=str(services.log_dir),
        template="subject_filewords.txt",
        learn_rate="0.05",
        max_steps=4,
        save_every=0,
        preview_steps=2,
        seed=3,
        validate_every=0,
    )
    return quick_train_config(**{**settings, **changes})


def test_a_run_trains_in_place_previews_through_txt2img_and_the_webui_loads_the_result(sdxl_run):
    from modules import processing, shared

    webui, services = sdxl_run
    initial = load_embedding(webui.embeddings_dir / f"{NAME}.safetensors").vectors
    before = model_fingerprint(webui.model)
    previews = []
    real_render = services.render_preview

    def render_and_record(request):
        previews.append((request.prompt, {k: v.clone() for k, v in request.vectors[NAME].items()}))
        return real_render(request)

    services.render_preview = render_and_record
    jobs = JobRegistry(services, run_exclusive=a1111.run_exclusive)
    job = jobs.start(config_for(webui, services, preview_every=2, preview_prompt=f"a photo of {NAME}"))
    progress = jobs.wait(job, timeout=120)

    assert progress.status == "finished", progress
    assert progress.step == 4 and shared.state.job == ""
    assert_same_fingerprint(before, model_fingerprint(webui.model))
    loaded = webui.db.word_embeddings[NAME]
    assert NAME not in webui.db.skipped_embeddings and not webui.db.load_errors
    assert (loaded.vectors, loaded.shape) == (2, CROSSATTN_WIDTH)
    # The step and checkpoint sit in the .safetensors header, which A1111 does not read (its step is None).
    saved = load_embedding(webui.embeddings_dir / f"{NAME}.safetensors")
    assert (saved.step, saved.sd_checkpoint_name) == (4, "tiny-sdxl")
    for key in ("clip_l", "clip_g"):
        torch.testing.assert_close(loaded.vec[key].cpu(), saved.vectors[key])
    for key in ("clip_l", "clip_g"):
        assert not torch.allclose(loaded.vec[key].cpu(), initial[key]), f"training did not change {key}"
    # Usable at once: the WebUI's own generation conditioning takes the trained vectors.
    backend = a1111.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 2)
    trained = {key: value.cpu() for key, value in loaded.vec.items()}
    prompt = f"a photo of {NAME}"
    assert_same_conditioning(
        our_conditioning(backend, prompt, 64, 64, {NAME: trained}),
        webui_conditioning(webui.model, prompt, 64, 64),
    )
    # Previews went through txt2img with the run's vectors, not the file on disk.
    assert len(previews) == 2 and len(processing.conditioning_log) == 2
    for (prompt, vectors), (logged_prompt, logged) in zip(previews, processing.conditioning_log):
        assert logged_prompt == prompt
        with torch.no_grad():
            ours = backend.prompt_encoder([prompt], {NAME: vectors})
            stale = backend.prompt_encoder([prompt], {NAME: initial})
        torch.testing.assert_close(logged["crossattn"], ours.hidden, rtol=0, atol=1e-6)
        assert not torch.allclose(logged["crossattn"], stale.hidden, atol=1e-4)
    assert NAME in webui.db.word_embeddings and isinstance(webui.db.word_embeddings[NAME].vec, dict)


@pytest.mark.parametrize("fresh_sdxl_webui", [MEDVRAM_SDXL], indirect=True)
def test_under_medvram_sdxl_a_run_takes_placement_over_and_gives_it_back(fresh_sdxl_run, monkeypatch):
    from ti_trainer.memory import plan as memory_plan
    from ti_trainer.training import setup

    webui, services = fresh_sdxl_run
    model = webui.model
    assert model.lowvram and lowvram_hooks(model)
    before, hooks_before = model_fingerprint(model), pre_hooks(model)
    vae_wrappers = {name: vars(model.first_stage_model)[name] for name in ("encode", "decode")}
    during, lent, depth, open_now = [], [], [], [0]
    real_lent = memory_plan.text_encoder_lent

    @contextlib.contextmanager
    def recorded_lent(module, device):
        lent.append(module)
        open_now[0] += 1
        depth.append(open_now[0])  # how many lendings are open, this one included
        try:
            with real_lent(module, device):
                yield
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(memory_plan, "text_encoder_lent", recorded_lent)
    # The plan asks for lending too: the placement lends already, and each forward must be lent once.
    run_plan = setup.plan_for
    monkeypatch.setattr(
        setup, "plan_for", lambda c, b: dataclasses.replace(run_plan(c, b), text_encoders_lent=True)
    )
    result = train(
        config_for(webui, services, preview_every=2),
        services.get_backend(),
        TrainingHooks(
            on_message=lambda text: None,
            on_step=lambda record: during.append(len(lowvram_hooks(model))),
            render_preview=services.render_preview,
        ),
    )
    assert result.steps_done == 4
    assert during and set(during) == {0}, "the WebUI's placement hooks are out while training"
    # The text encoders came to the device for each forward, one after the other; the UNet stayed there.
    text_l, text_g = (embedder.wrapped for embedder in model.conditioner.embedders[:2])
    assert lent[:2] == [text_l, text_g] and set(map(id, lent)) == {id(text_l), id(text_g)}
    assert set(depth) == {1}, "never lent twice over"
    assert pre_hooks(model) == hooks_before, "and back, in order, afterwards"
    assert {name: vars(model.first_stage_model)[name] for name in vae_wrappers} == vae_wrappers
    assert (result.log_folder / "images" / f"{NAME}-4.png").is_file()  # a preview with the WebUI's hooks
    assert_same_fingerprint(before, model_fingerprint(model))


@FP8_RUNS_ON_CPU
@pytest.mark.parametrize("fresh_sdxl_webui", [FP8_FOR_SDXL], indirect=True)
def test_with_fp8_weight_storage_a_run_trains_and_the_fp8_weights_stay_as_stored(fresh_sdxl_run):
    from modules import devices

    webui, services = fresh_sdxl_run
    model = webui.model
    assert devices.fp8 and a1111.get_backend().fp8_weights
    initial = load_embedding(webui.embeddings_dir / f"{NAME}.safetensors").vectors
    before = model_fingerprint(model)
    unet_linear = next(m for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    during = []
    # The run's own precision is fp32 on the CPU: the FP8 weights compute through the WebUI's autocast.
    result = train(
        config_for(webui, services),
        services.get_backend(),
        TrainingHooks(on_message=lambda t: None, on_step=lambda r: during.append(unet_linear.weight.dtype)),
    )
    assert during and set(during) == {torch.float8_e4m3fn}
    assert result.steps_done == 4 and not result.skipped_steps
    assert_same_fingerprint(before, model_fingerprint(model))  # dtypes (float8) and values bit for bit
    trained = load_embedding(webui.embeddings_dir / f"{NAME}.safetensors").vectors
    for key in ("clip_l", "clip_g"):
        assert torch.isfinite(trained[key]).all() and not torch.equal(trained[key], initial[key])


def test_the_memory_levers_keep_fp8_weights_and_lower_the_others_only_for_the_run(webui_sdxl):
    from ti_trainer.backends.sgm_memory import sgm_memory_levers
    from ti_trainer.memory.plan import MemoryPlan

    model = webui_sdxl.model
    plan = MemoryPlan(precision="bf16", half_weights=True, checkpointing="all")
    unet_linear = next(m for m in model.model.modules() if isinstance(m, torch.nn.Linear))
    text_table = model.conditioner.embedders[1].wrapped.model.token_embedding.wrapped
    vae_conv = model.first_stage_model.encoder.conv_in
    before = model_fingerprint(model)
    with sgm_memory_levers(model, plan):
        assert unet_linear.weight.dtype == text_table.weight.dtype == torch.bfloat16
        assert vae_conv.weight.dtype == torch.float32  # SDXL's VAE is never lowered
    assert_same_fingerprint(before, model_fingerprint(model))
    stored = unet_linear.weight.data
    unet_linear.weight.data = stored.to(torch.float8_e4m3fn)  # as the WebUI's FP8 storage keeps it
    try:
        with sgm_memory_levers(model, plan, keep_fp8=True):
            assert (
                unet_linear.weight.dtype == torch.float8_e4m3fn and text_table.weight.dtype == torch.float32
            )
    finally:
        unet_linear.weight.data = stored


def test_the_attention_and_checkpointing_levers_reach_sgms_unet_during_a_run_only(webui_sdxl, monkeypatch):
    from ti_trainer.backends import ldm_memory
    from ti_trainer.backends.sgm_memory import sgm_memory_levers
    from ti_trainer.memory.plan import MemoryPlan

    calls = []
    real_attention = ldm_memory.attention
    monkeypatch.setattr(
        ldm_memory, "attention", lambda *a, **k: calls.append(a[3]) or real_attention(*a, **k)
    )
    model, backend = webui_sdxl.model, a1111.get_backend()
    latents, timesteps = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        cond = backend.prompt_encoder(["a red cat"], {})
        expected = backend.predict(latents, timesteps, cond)
        with sgm_memory_levers(model, MemoryPlan(attention="math", checkpointing="all")):
            levered = backend.predict(latents, timesteps, cond)
        assert calls and set(calls) == {"math"}
        count = len(calls)
        backend.predict(latents, timesteps, cond)
    assert len(calls) == count, "our attention must not stay patched in after the run"
    torch.testing.assert_close(levered, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_our_sdxl_files_load_in_the_webui_at_their_width(webui_sdxl, suffix):
    from ti_trainer.embeddings.embedding import Embedding
    from ti_trainer.embeddings.files import save_embedding

    vectors = random_vectors(rows=3)
    save_embedding(Embedding(NAME, vectors, step=7), webui_sdxl.embeddings_dir / f"{NAME}{suffix}")
    webui_sdxl.db.load_textual_inversion_embeddings(force_reload=True)
    assert not webui_sdxl.db.load_errors
    loaded = webui_sdxl.db.word_embeddings[NAME]
    assert (loaded.vectors, loaded.shape, set(loaded.vec)) == (3, CROSSATTN_WIDTH, {"clip_l", "clip_g"})


def test_a_lent_text_encoder_computes_on_the_device_and_keeps_its_ram_storage():
    from ti_trainer.backends.sgm_memory import SdxlTrainingPlacement
    from ti_trainer.memory.plan import text_encoder_lent

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    module.register_buffer("scale", torch.ones(4))
    storage = {name: t.data_ptr() for name, t in [*module.named_parameters(), *module.named_buffers()]}
    # "meta" stands for the GPU here: only the CPU is available.
    with text_encoder_lent(module, torch.device("meta")):
        assert {t.device.type for t in [*module.parameters(), *module.buffers()]} == {"meta"}
    assert {
        name: t.data_ptr() for name, t in [*module.named_parameters(), *module.named_buffers()]
    } == storage
    with text_encoder_lent(module, torch.device("cpu")):  # on the CPU nothing moves
        assert module[0].weight.data_ptr() == storage["0.weight"]
    model = types.SimpleNamespace(model=torch.nn.Linear(1, 1), conditioner=module)
    assert SdxlTrainingPlacement(model, "cpu").parts_on_device == [model.model]


# --- the text encoders lent outside --medvram-sdxl (the plan's text_encoders_lent) ---------------------------


def simulated_gpu(monkeypatch, backend, *modules):
    """The model's `modules` and the backend "on cuda:0" (only the CPU is here): where each module is, as
    `device_of` reads it, follows its recorded moves."""
    from ti_trainer.memory import plan as memory_plan

    gpu = torch.device("cuda", 0)
    where = {id(module): gpu for module in modules}
    moves = []
    real_device_of = memory_plan.device_of
    monkeypatch.setattr(memory_plan, "device_of", lambda m: where.get(id(m)) or real_device_of(m))

    def move(module, device):
        where[id(module)] = torch.device(device)
        moves.append((module, torch.device(device)))
        return module

    for module in modules:
        monkeypatch.setattr(module, "to", lambda device, m=module: move(m, device))
    monkeypatch.setattr(backend, "device", gpu)
    return where, moves


def test_the_plan_keeps_the_text_encoders_in_ram_for_the_run_and_previews_get_them_back(
    webui_sdxl, monkeypatch
):
    from ti_trainer.memory.plan import MemoryPlan

    backend, model = a1111.get_backend(), webui_sdxl.model
    conditioner, vae = model.conditioner, model.first_stage_model
    where, moves = simulated_gpu(monkeypatch, backend, conditioner, vae)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    with backend.memory_levers(MemoryPlan()):
        assert moves == []
    with backend.memory_levers(MemoryPlan(text_encoders_lent=True)):
        assert where[id(conditioner)] == cpu and where[id(vae)] == gpu
        with backend.previewing():  # the WebUI's txt2img computes its conditioning with them where they are
            assert where[id(conditioner)] == gpu
        assert where[id(conditioner)] == cpu
    assert where[id(conditioner)] == gpu
    assert [(m is conditioner, d) for m, d in moves] == [(True, cpu), (True, gpu), (True, cpu), (True, gpu)]


def test_the_plan_lends_each_text_encoder_for_its_own_forward_only_while_it_holds(webui_sdxl, monkeypatch):
    """Which encoder is lent, to where, and when; what lending does to an encoder (it computes on the
    device, its RAM storage kept) is test_a_lent_text_encoder_computes_on_the_device_and_keeps_its_ram_storage.
    (The meta device cannot stand in for the GPU here: transformers 4.30's CLIP builds its mask with .item().)"""
    from ti_trainer.memory import plan as memory_plan

    backend, model = a1111.get_backend(), webui_sdxl.model
    calls = []

    @contextlib.contextmanager
    def recorded(module, device):
        calls.append((module, device))
        yield

    monkeypatch.setattr(memory_plan, "text_encoder_lent", recorded)
    text_l, text_g = (embedder.wrapped for embedder in model.conditioner.embedders[:2])
    with backend.memory_levers(memory_plan.MemoryPlan()):
        backend.prompt_encoder(["a red cat"], {})
    assert calls == []
    with backend.memory_levers(memory_plan.MemoryPlan(text_encoders_lent=True)):
        backend.prompt_encoder(["a red cat"], {})
    assert calls == [(text_l, backend.device), (text_g, backend.device)]
    backend.prompt_encoder(["a red cat"], {})
    assert len(calls) == 2, "not after the run"


def test_a_run_with_the_text_encoders_lent_trains_the_same_vectors_and_leaves_the_model_as_found(
    sdxl_run, monkeypatch
):
    """Each encoder's forward lent, and what its backward keeps packed as on a GPU (the lending stood in for
    on the CPU: tests/lent_on_cpu.py): the vectors must come out bit for bit as without the lever."""
    from lent_on_cpu import lent_in_other_storage

    from ti_trainer.memory import plan as memory_plan
    from ti_trainer.training import setup

    webui, services = sdxl_run
    other = "xlembtwo"
    create_embedding(services.get_backend(), other, "a cat", 2, services.embeddings_dir)
    services.refresh_embeddings()
    before = model_fingerprint(webui.model)
    quiet = TrainingHooks(on_message=lambda text: None)
    plain = train(config_for(webui, services), services.get_backend(), quiet)

    lent = []
    real_lent = memory_plan.text_encoder_lent

    @contextlib.contextmanager
    def lent_as_on_a_gpu(module, device):
        lent.append(module)
        with real_lent(module, device), lent_in_other_storage(module, device):
            yield

    monkeypatch.setattr(memory_plan, "text_encoder_lent", lent_as_on_a_gpu)
    run_plan = setup.plan_for
    monkeypatch.setattr(
        setup, "plan_for", lambda c, b: dataclasses.replace(run_plan(c, b), text_encoders_lent=True)
    )
    messages = []
    lent_run = train(
        config_for(webui, services, embedding_name=other),
        services.get_backend(),
        TrainingHooks(on_message=messages.append),
    )
    assert any(m.startswith("Memory: ") and "text encoders in RAM" in m for m in messages)
    text_l, text_g = (embedder.wrapped for embedder in webui.model.conditioner.embedders[:2])
    assert {id(module) for module in lent} == {id(text_l), id(text_g)}
    a, b = load_embedding(plain.embedding_path), load_embedding(lent_run.embedding_path)
    assert a.step == b.step == 4
    for key in ("clip_l", "clip_g"):
        assert torch.equal(a.vectors[key], b.vectors[key]), key
    assert_same_fingerprint(before, model_fingerprint(webui.model))


def test_the_vram_estimate_reads_the_webuis_sdxl_as_sdxl(webui_sdxl):
    from ti_trainer.vram.architectures import architecture_of_backend

    assert architecture_of_backend(a1111.get_backend()).name == "sdxl"


def test_create_and_train_through_the_api_on_the_webuis_sdxl(sdxl_run):
    import time

    from test_api import client_for

    webui, _ = sdxl_run
    client = client_for(webui)
    created = client.post(
        "/ti-trainer/v1/create", json={"name": "apixl", "init_text": "a dog", "num_vectors": 1}
    )
    assert created.status_code == 200, created.text
    assert set(webui.db.word_embeddings["apixl"].vec) == {"clip_l", "clip_g"}
    before = model_fingerprint(webui.model)
    settings = {
        "embedding_name": "apixl",
        "data_dir": str(webui.data_dir),
        "template": "subject_filewords.txt",
        "max_steps": 2,
        "width": 64,
        "height": 64,
        "preview_every": 0,
        "validate_every": 0,
    }
    job_id = client.post("/ti-trainer/v1/train", json=settings).json()["id"]
    progress = {}
    for _ in range(1200):
        progress = client.get(f"/ti-trainer/v1/progress/{job_id}").json()
        if progress["status"] in ("finished", "failed", "interrupted"):
            break
        time.sleep(0.05)
    assert progress["status"] == "finished", progress
    assert progress["embedding_path"] == str(webui.embeddings_dir / "apixl.safetensors")
    assert_same_fingerprint(before, model_fingerprint(webui.model))
    assert load_embedding(webui.embeddings_dir / "apixl.safetensors").step == 2
    assert webui.db.word_embeddings["apixl"].vectors == 1 and not webui.db.load_errors


def test_an_api_interrupt_stops_an_sdxl_run_which_saves_where_it_stopped(sdxl_run):
    import time

    from test_api import client_for

    webui, _ = sdxl_run
    client = client_for(webui)
    before = model_fingerprint(webui.model)
    settings = {
        "embedding_name": NAME,
        "data_dir": str(webui.data_dir),
        "template": "subject_filewords.txt",
        "max_steps": 1000,  # far more than it gets to: the interrupt ends it
        "width": 64,
        "height": 64,
        "save_every": 0,
        "preview_every": 0,
        "validate_every": 0,
    }
    job_id = client.post("/ti-trainer/v1/train", json=settings).json()["id"]
    progress = {}
    for _ in range(1200):
        progress = client.get(f"/ti-trainer/v1/progress/{job_id}").json()
        if progress["step"] >= 1 or progress["status"] in ("finished", "failed"):
            break
        time.sleep(0.05)
    assert progress["status"] == "running", progress
    answer = client.post(f"/ti-trainer/v1/interrupt/{job_id}")
    assert answer.status_code == 200 and answer.json()["stop_requested"], answer.text
    for _ in range(1200):
        progress = client.get(f"/ti-trainer/v1/progress/{job_id}").json()
        if progress["status"] in ("finished", "failed", "interrupted"):
            break
        time.sleep(0.05)
    assert progress["status"] == "interrupted", progress
    assert 1 <= progress["step"] < 1000
    saved = load_embedding(webui.embeddings_dir / f"{NAME}.safetensors")
    assert saved.step == progress["step"] and set(saved.vectors) == {"clip_l", "clip_g"}
    assert_same_fingerprint(before, model_fingerprint(webui.model))
    assert webui.db.word_embeddings[NAME].vectors == 2 and not webui.db.load_errors
