"""SDXL end to end in the stand-in Forge, as an artist and a script drive it: an embedding created and trained
from the panels' handlers and through the API, previews through Forge's txt2img with the in-training vectors,
and the result loaded by Forge's embedding loader into both of SDXL's text engines, usable at once."""

import time

import torch
from forge_state import assert_same_fingerprint, memory_state, model_fingerprint
from quick_runs import quick_settings

from ti_trainer.backends.forge_xl_backend import ForgeXLBackend
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.host import forge as forge_host
from ti_trainer.progress import LiveRun
from ti_trainer.ui import create_panel, train_handlers
from ti_trainer.ui.train_form import form_fields, form_values, initial_config

NAME = "xlemb"
PROMPT = f"a photo of {NAME}"


def form_for(services, dataset, **changes) -> tuple[list[str], list]:
    """The Train panel's form values (in form_fields() order) for a quick run, as the page hands them in."""
    config = initial_config(services)
    settings = quick_settings(
        embedding_name=NAME,
        data_dir=str(dataset),
        max_steps=4,
        preview_every=2,
        preview_steps=2,
        preview_prompt=PROMPT,
        validate_every=0,
        seed=3,
        learn_rate="0.05",
    )
    for key, value in {**settings, **changes}.items():
        setattr(config, key, value)
    names = form_fields()
    return names, form_values(config, names)


def in_engines(forge, name: str) -> list:
    """The embedding `name` as each of SDXL's engines holds it (None where it is not registered)."""
    return [engine.embeddings.word_embeddings.get(name) for engine in forge.engines]


def generation_conditioning(forge, prompt: str, height: int = 64, width: int = 64) -> dict:
    from modules.prompt_parser import SdConditioning

    return forge.model.get_learned_conditioning(SdConditioning([prompt], width=width, height=height))


def ours(backend, prompt: str, vectors: dict, height: int = 64, width: int = 64) -> dict:
    backend.prompt_encoder.chunker.register(NAME, 2)
    with torch.no_grad():
        return backend.unet_conditioning(backend.prompt_encoder([prompt], {NAME: vectors}), height, width)


def assert_conditioning_equal(a: dict, b: dict) -> None:
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_create_and_train_from_the_panels_with_previews_through_forges_txt2img(forge_xl, dataset_xl):
    from backend import memory_management
    from modules import processing, shared

    services = forge_host.host_services()
    assert isinstance(services.get_backend(), ForgeXLBackend)

    result, _ = create_panel.create_embedding_job(services, NAME, "a cat", 2, False)
    path = forge_xl.embeddings_dir / f"{NAME}.safetensors"
    assert "ti-trainer-ok" in result and path.is_file()
    created = load_embedding(path).vectors
    for held in in_engines(forge_xl, NAME):  # Forge's loader, in each engine, at once
        assert held.vectors == 2 and held.shape == 32 + 48 and set(held.vec) == {"clip_l", "clip_g"}

    memory_management.load_models_gpu([forge_xl.model.forge_objects.vae.patcher])  # as after a generation
    found_memory = memory_state()
    before = model_fingerprint(forge_xl.model)
    previews = []
    real_render = services.render_preview

    def render_and_record(request):
        held = in_engines(forge_xl, NAME)
        previews.append((request.prompt, {k: v.clone() for k, v in request.vectors[NAME].items()}))
        image = real_render(request)
        assert in_engines(forge_xl, NAME) == held  # the run's vectors were registered only meanwhile
        return image

    services.render_preview = render_and_record
    names, values = form_for(services, dataset_xl)
    live = LiveRun()
    result, _ = services.wrap_job(train_handlers.run_training_job)(services, live, names, "task(1)", *values)

    assert "ti-trainer-ok" in result and "finished at 4 steps" in result, result
    assert live.snapshot().status == "finished" and shared.state.job == ""
    assert memory_state() == found_memory
    assert_same_fingerprint(before, model_fingerprint(forge_xl.model))

    # The saved file, as Forge's loader registered it in both engines, is what a generation uses.
    saved = load_embedding(path).vectors
    assert all(not torch.allclose(saved[key], created[key]) for key in saved), "training changed nothing"
    for held in in_engines(forge_xl, NAME):
        for key in ("clip_l", "clip_g"):
            torch.testing.assert_close(held.vec[key], saved[key])
    backend = services.get_backend()
    assert_conditioning_equal(generation_conditioning(forge_xl, PROMPT), ours(backend, PROMPT, saved))

    # Previews went through Forge's txt2img with the run's vectors, not the file's, at the preview's size.
    assert len(previews) == 2 and len(processing.conditioning_log) == 2
    for (prompt, vectors), (logged_prompt, conditioning) in zip(previews, processing.conditioning_log):
        assert logged_prompt == prompt == PROMPT
        assert_conditioning_equal(conditioning, ours(backend, prompt, vectors))
        stale = ours(backend, prompt, created)
        assert not torch.allclose(conditioning["crossattn"], stale["crossattn"]), "the preview used the file"
    assert len(list(services.log_dir.rglob(f"images/{NAME}-*.png"))) == 2


def test_create_and_train_through_the_api(forge_xl, dataset_xl):
    import webui as forge_startup
    from fastapi.testclient import TestClient
    from modules import script_callbacks, shared

    shared.cmd_opts.nowebui = True
    script_callbacks.clear_callbacks()
    forge_host.register_callbacks()
    client = TestClient(forge_startup.start())
    before = model_fingerprint(forge_xl.model)

    response = client.post(
        "/ti-trainer/v1/create", json={"name": NAME, "init_text": "a dog", "num_vectors": 2}
    )
    assert response.status_code == 200, response.text
    assert all(held is not None and held.vectors == 2 for held in in_engines(forge_xl, NAME))
    created = load_embedding(forge_xl.embeddings_dir / f"{NAME}.safetensors").vectors

    settings = quick_settings(
        embedding_name=NAME, data_dir=str(dataset_xl), max_steps=3, save_every=0, validate_every=0, seed=5
    )
    response = client.post("/ti-trainer/v1/train", json=settings)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 120
    while (progress := client.get(f"/ti-trainer/v1/progress/{job_id}").json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, progress
        time.sleep(0.05)

    assert progress["status"] == "finished" and progress["step"] == 3, progress
    assert_same_fingerprint(before, model_fingerprint(forge_xl.model))
    saved = load_embedding(forge_xl.embeddings_dir / f"{NAME}.safetensors").vectors
    assert not torch.allclose(saved["clip_g"], created["clip_g"])
    for held in in_engines(forge_xl, NAME):
        torch.testing.assert_close(held.vec["clip_l"], saved["clip_l"])
        torch.testing.assert_close(held.vec["clip_g"], saved["clip_g"])
