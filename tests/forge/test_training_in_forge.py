"""Training through the Forge host on the stand-in's tiny SD 2.x v model: the run goes through Forge's memory
management on Forge's own model objects; the result lands in the embeddings folder and in the engine's
database, usable at once; previews go through Forge's txt2img with the in-training vectors; the model and
Forge's memory state are left as found after success, error and Interrupt."""

import threading

import pytest
import torch
from forge_state import assert_same_fingerprint, memory_state, model_fingerprint
from quick_runs import quick_train_config

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.errors import UserError
from ti_trainer.host import forge as forge_host
from ti_trainer.host.jobs import JobRegistry

NAME = "tiemb"


@pytest.fixture
def services(forge, dataset):
    services = forge_host.host_services()
    path = create_embedding(services.get_backend(), NAME, "a cat", 2, services.embeddings_dir)
    services.refresh_embeddings()
    assert path.parent == forge.embeddings_dir and NAME in forge.engine.embeddings.word_embeddings
    return services


def config_for(services, dataset, **changes) -> TrainConfig:
    settings = dict(
        embedding_name=NAME,
        data_dir=str(dataset),
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


def database_state(db):
    return dict(db.word_embeddings), {key: list(value) for key, value in db.ids_lookup.items()}


def test_a_run_trains_in_place_and_its_result_is_usable_at_once(forge, services, dataset, monkeypatch):
    from backend import memory_management
    from modules import processing, shared

    calls = []
    real_load = memory_management.load_models_gpu
    monkeypatch.setattr(
        memory_management,
        "load_models_gpu",
        lambda models, memory_required=0, hard_memory_preservation=0: (
            calls.append((list(models), memory_required)),
            real_load(models, memory_required, hard_memory_preservation),
        )[1],
    )
    memory_management.load_models_gpu([forge.model.forge_objects.vae.patcher])  # as after a generation
    found_memory = memory_state()
    initial = load_embedding(forge.embeddings_dir / f"{NAME}.pt").vectors
    before = model_fingerprint(forge.model)
    previews = []
    real_render = services.render_preview

    def render_and_check(request):
        state = database_state(forge.engine.embeddings)
        image = real_render(request)
        assert (
            database_state(forge.engine.embeddings) == state
        )  # the in-training vectors registered only meanwhile
        previews.append((request.prompt, request.vectors[NAME].clone()))
        return image

    services.render_preview = render_and_check
    jobs = JobRegistry(services, run_exclusive=forge_host.run_exclusive)
    job = jobs.start(config_for(services, dataset, preview_every=2, preview_prompt=f"a photo of {NAME}"))
    progress = jobs.wait(job, timeout=120)

    assert progress.status == "finished", progress
    assert progress.step == 4 and shared.state.job == ""
    objects = forge.model.forge_objects_original
    asked = [memory for models, memory in calls if models == [objects.unet, objects.clip.patcher]]
    assert asked and min(asked) >= 0 and max(asked) > objects.unet.memory_required([1, 4, 8, 8])
    assert memory_state() == found_memory
    assert_same_fingerprint(before, model_fingerprint(forge.model))

    # In Forge's engine database at once, and what a generation with the name computes.
    loaded = forge.engine.embeddings.word_embeddings[NAME]
    assert loaded.step == 4 and loaded.vectors == 2 and loaded.shape == 32
    assert not torch.allclose(loaded.vec, initial), "training did not change the vectors"
    saved = load_embedding(forge.embeddings_dir / f"{NAME}.pt").vectors
    torch.testing.assert_close(loaded.vec, saved)
    backend = services.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 2)
    with torch.no_grad():
        ours = backend.prompt_encoder([f"a photo of {NAME}"], {NAME: saved})
    torch.testing.assert_close(
        forge.model.get_learned_conditioning([f"a photo of {NAME}"]), ours, rtol=0, atol=1e-6
    )

    # Previews through Forge's txt2img used the run's vectors, not the file's.
    assert len(previews) == 2 and len(processing.conditioning_log) == 2
    for (prompt, vectors), (logged_prompt, conditioning) in zip(previews, processing.conditioning_log):
        assert logged_prompt == prompt
        with torch.no_grad():
            torch.testing.assert_close(conditioning, backend.prompt_encoder([prompt], {NAME: vectors}))
            stale = backend.prompt_encoder([prompt], {NAME: initial})
        assert not torch.allclose(conditioning, stale), "the preview used the file on disk"
    assert len(list(services.log_dir.rglob(f"images/{NAME}-*.png"))) == 2


def test_forges_interrupt_stops_the_run_which_saves_and_gives_everything_back(forge, services, dataset):
    from modules import shared

    found_memory = memory_state()
    before = model_fingerprint(forge.model)
    services.job_progress = lambda done, total, text: shared.state.interrupt() if done == 1 else None
    jobs = JobRegistry(services, run_exclusive=forge_host.run_exclusive)
    progress = jobs.wait(jobs.start(config_for(services, dataset)), timeout=120)

    assert progress.status == "interrupted" and progress.step == 1
    assert forge.engine.embeddings.word_embeddings[NAME].step == 1  # saved where it stopped, registered
    assert memory_state() == found_memory
    assert_same_fingerprint(before, model_fingerprint(forge.model))


def test_an_error_mid_run_fails_the_job_and_gives_everything_back(forge, services, dataset):
    found_memory = memory_state()
    before = model_fingerprint(forge.model)

    def broken_preview(request):
        raise RuntimeError("the preview sampler broke")

    services.render_preview = broken_preview
    jobs = JobRegistry(services, run_exclusive=forge_host.run_exclusive)
    progress = jobs.wait(jobs.start(config_for(services, dataset, preview_every=1)), timeout=120)

    assert progress.status == "failed" and "the preview sampler broke" in progress.error
    assert memory_state() == found_memory
    assert_same_fingerprint(before, model_fingerprint(forge.model))
    assert forge.engine.embeddings.word_embeddings[NAME].step == 0


def test_an_interrupt_through_forges_api_stops_a_job(forge, services, dataset):
    from fastapi.testclient import TestClient
    from modules import shared

    shared.cmd_opts.api = True
    import webui as forge_startup

    client = TestClient(forge_startup.start())
    started = threading.Event()

    def interrupt_at_first_step(done, total, text):
        if not started.is_set():
            started.set()
            assert client.post("/sdapi/v1/interrupt").status_code == 200

    services.job_progress = interrupt_at_first_step
    jobs = JobRegistry(services, run_exclusive=forge_host.run_exclusive)
    progress = jobs.wait(jobs.start(config_for(services, dataset)), timeout=120)
    assert progress.status == "interrupted" and progress.step == 1


def test_the_backend_loads_the_model_if_forge_has_not_yet(forge_unloaded):
    from modules import sd_models, shared

    assert isinstance(shared.sd_model, sd_models.FakeInitialModel)
    backend = forge_host.get_backend()
    assert shared.sd_model.forge_objects is not None and backend.loan.model is shared.sd_model
    assert backend.model_name == "tiny-sd2" and backend.model_hash == "f0e1d2c3b4"


def test_no_checkpoint_is_a_message_not_a_traceback(forge_unloaded):
    from modules import sd_models

    sd_models.model_data.forge_loading_parameters = {"checkpoint_info": None}
    with pytest.raises(UserError, match="checkpoint list"):
        forge_host.get_backend()


def test_refreshing_registers_new_files_in_the_engines_database(forge):
    """Forge reads the embeddings folder once, when the model loads; a file written later is registered by
    the host's refresh, and one of another width is skipped as Forge skips it."""
    from ti_trainer.embeddings.embedding import Embedding
    from ti_trainer.embeddings.files import save_embedding

    save_embedding(Embedding("fresh", torch.randn(3, 32), step=7), forge.embeddings_dir / "fresh.pt")
    save_embedding(Embedding("wide", torch.randn(1, 64), step=1), forge.embeddings_dir / "wide.pt")
    assert "fresh" not in forge.engine.embeddings.word_embeddings
    forge_host.refresh_embeddings()
    assert forge.engine.embeddings.word_embeddings["fresh"].step == 7
    assert "wide" in forge.engine.embeddings.skipped_embeddings
