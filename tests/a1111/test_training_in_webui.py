"""Training through the WebUI host on the tiny ldm SD 2.x 768-v model: the result lands in the WebUI's
embeddings folder and its database loads it; previews go through its txt2img with the in-training vectors;
the model and the database are left as found after success, error and Interrupt."""

import os
import threading

import pytest
import torch
from model_state import assert_same_fingerprint, model_fingerprint
from quick_runs import quick_train_config

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import create_embedding
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.host import a1111
from ti_trainer.host.jobs import JobRegistry

NAME = "tiemb"


@pytest.fixture
def services(webui, dataset):
    services = a1111.host_services()
    path = create_embedding(services.get_backend(), NAME, "a cat", 2, services.embeddings_dir)
    services.refresh_embeddings()
    assert path.parent == webui.embeddings_dir and NAME in webui.db.word_embeddings
    return services


def config_for(services, dataset, **changes) -> TrainConfig:
    """A quick run in the WebUI's folders: no copies or previews unless the test asks for them."""
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
    return (
        dict(db.word_embeddings),
        {key: list(value) for key, value in db.ids_lookup.items()},
        dict(db.skipped_embeddings),
    )


def test_a_run_writes_an_embedding_the_webui_loads_and_previews_use_the_trained_vectors(
    webui, services, dataset
):
    from modules import processing, shared

    initial = load_embedding(webui.embeddings_dir / f"{NAME}.pt").vectors
    before = model_fingerprint(webui.model)
    previews = []
    real_render = services.render_preview

    def render_and_check(request):
        # The embeddings folder changed since the WebUI last read it (as when a run saves a copy there): a
        # preview that let the WebUI reload would get the file's vectors instead of the run's.
        moved = webui.embeddings_dir.stat().st_mtime + 10
        os.utime(webui.embeddings_dir, (moved, moved))
        state = database_state(webui.db)
        image = real_render(request)
        assert database_state(webui.db) == state
        previews.append((request.prompt, request.vectors[NAME].clone()))
        return image

    services.render_preview = render_and_check
    jobs = JobRegistry(services, run_exclusive=a1111.run_exclusive)
    job = jobs.start(config_for(services, dataset, preview_every=2, preview_prompt=f"a photo of {NAME}"))
    progress = jobs.wait(job, timeout=60)

    assert progress.status == "finished", progress
    assert progress.step == 4 and shared.state.job == ""  # the WebUI's job ended
    saved = webui.embeddings_dir / f"{NAME}.pt"
    assert progress.embedding_path == str(saved)
    loaded = webui.db.word_embeddings[NAME]
    assert NAME not in webui.db.skipped_embeddings and not webui.db.load_errors
    assert loaded.step == 4 and loaded.vectors == 2 and loaded.shape == 32
    assert loaded.sd_checkpoint == "a3b1c2d4e5" and loaded.sd_checkpoint_name == "tiny-sd2-768-v"
    assert not torch.allclose(loaded.vec.cpu(), initial), "training did not change the vectors"
    torch.testing.assert_close(loaded.vec.cpu(), load_embedding(saved).vectors)

    assert len(previews) == 2 and len(processing.conditioning_log) == 2
    backend = a1111.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 2)
    for (prompt, vectors), (logged_prompt, conditioning) in zip(previews, processing.conditioning_log):
        assert logged_prompt == prompt
        with torch.no_grad():
            torch.testing.assert_close(conditioning, backend.prompt_encoder([prompt], {NAME: vectors}))
            stale = backend.prompt_encoder([prompt], {NAME: initial})
        assert not torch.allclose(conditioning, stale), (
            "the preview used the file on disk, not the run's vectors"
        )
    assert len(list(services.log_dir.rglob(f"images/{NAME}-*.png"))) == 2
    assert_same_fingerprint(before, model_fingerprint(webui.model))


def test_the_webuis_interrupt_stops_the_run_which_saves_and_gives_everything_back(webui, services, dataset):
    from modules import shared

    before = model_fingerprint(webui.model)
    services.job_progress = lambda done, total, text: shared.state.interrupt() if done == 1 else None
    jobs = JobRegistry(services, run_exclusive=a1111.run_exclusive)
    progress = jobs.wait(jobs.start(config_for(services, dataset)), timeout=60)

    assert progress.status == "interrupted" and progress.step == 1
    assert webui.db.word_embeddings[NAME].step == 1  # saved where it stopped, and reloaded
    assert_same_fingerprint(before, model_fingerprint(webui.model))


def test_an_api_interrupt_stops_its_job(webui, services, dataset):
    jobs = JobRegistry(services, run_exclusive=a1111.run_exclusive)
    started, job_ids = threading.Event(), []

    def interrupt_at_first_step(done, total, text):
        started.wait(10)
        jobs.interrupt(job_ids[0])

    services.job_progress = interrupt_at_first_step
    job_ids.append(jobs.start(config_for(services, dataset)))
    started.set()
    progress = jobs.wait(job_ids[0], timeout=60)
    assert progress.status == "interrupted" and progress.step == 1


def test_an_error_mid_run_fails_the_job_with_its_message_and_gives_everything_back(webui, services, dataset):
    before = model_fingerprint(webui.model)
    db_before = database_state(webui.db)

    def broken_preview(request):
        raise RuntimeError("the preview sampler broke")

    services.render_preview = broken_preview
    jobs = JobRegistry(services, run_exclusive=a1111.run_exclusive)
    progress = jobs.wait(jobs.start(config_for(services, dataset, preview_every=1)), timeout=60)

    assert progress.status == "failed" and "the preview sampler broke" in progress.error
    assert_same_fingerprint(before, model_fingerprint(webui.model))
    assert database_state(webui.db)[0].keys() == db_before[0].keys()  # reloaded from the unchanged file
    assert webui.db.word_embeddings[NAME].step == 0


def test_bad_input_fails_before_training_with_the_message(webui, services, dataset):
    jobs = JobRegistry(services, run_exclusive=a1111.run_exclusive)
    progress = jobs.wait(
        jobs.start(config_for(services, dataset, template="no-such-template.txt")), timeout=60
    )
    assert progress.status == "failed" and "no-such-template.txt" in progress.error and progress.step == 0


def test_the_memory_levers_act_on_the_webuis_model_during_a_run_only(webui, services, dataset, monkeypatch):
    """Attention through our SDPA path and checkpointed blocks while training; previews still decode; the
    WebUI's own attention and flags are back afterwards."""
    from ti_trainer.backends import ldm_memory
    from ti_trainer.training.loop import TrainingHooks, train

    attention_calls = []
    real_attention = ldm_memory.attention
    monkeypatch.setattr(
        ldm_memory, "attention", lambda *a, **k: attention_calls.append(a[3]) or real_attention(*a, **k)
    )
    before = model_fingerprint(webui.model)

    config = config_for(services, dataset, attention="sdpa", gradient_checkpointing="all", preview_every=2)
    messages = []
    result = train(
        config,
        services.get_backend(),
        TrainingHooks(on_message=messages.append, render_preview=services.render_preview),
    )

    assert result.steps_done == 4
    assert "Memory: SDPA attention, checkpointing of every UNet block" in "\n".join(messages)
    assert attention_calls and set(attention_calls) == {"sdpa"}
    assert (result.log_folder / "images" / f"{NAME}-4.png").is_file()
    assert_same_fingerprint(before, model_fingerprint(webui.model))
    calls_after = len(attention_calls)
    webui.model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 77, 32))
    assert len(attention_calls) == calls_after, "our attention must not stay patched in after the run"


def test_under_medvram_a_run_takes_placement_over_and_gives_the_webuis_hooks_back(
    webui, services, dataset, monkeypatch
):
    from modules import shared
    from test_ldm_memory import LowVram, pre_hooks, setup_for_low_vram

    from ti_trainer.backends.ldm_memory import lowvram_hooks
    from ti_trainer.training.loop import TrainingHooks, train

    monkeypatch.setattr(shared.cmd_opts, "medvram", True)
    # The WebUI sets placement up on the model before its hijack wraps the text encoder.
    wrapper = webui.model.cond_stage_model
    webui.model.cond_stage_model = wrapper.wrapped
    setup_for_low_vram(webui.model, True, LowVram())
    webui.model.cond_stage_model = wrapper
    try:
        hooks_before = pre_hooks(webui.model)
        seen_during = []
        result = train(
            config_for(services, dataset),
            services.get_backend(),
            TrainingHooks(
                on_message=lambda t: None,
                on_step=lambda r: seen_during.append(len(lowvram_hooks(webui.model))),
            ),
        )
        assert result.steps_done == 4
        assert seen_during and set(seen_during) == {0}, "the WebUI's placement hooks are out while training"
        assert pre_hooks(webui.model) == hooks_before, "and back, in order, afterwards"
    finally:
        from test_ldm_memory import remove_low_vram

        remove_low_vram(webui.model)
