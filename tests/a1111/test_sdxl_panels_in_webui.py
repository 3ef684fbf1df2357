"""The panels' handlers on the WebUI's SDXL (the stand-in's tiny sgm SDXL through host/a1111.py): Create with
each encoder's token count from the WebUI's own tokenizers, Train with previews through its txt2img, the
comparison grid rendered by its txt2img with its size conditioning at the grid's size, and "use this step"
loaded by its embedding database. tests/ui drives the same handlers on the standalone host."""

from functools import partial

import numpy as np
import pytest
import torch
from model_state import assert_same_fingerprint, model_fingerprint
from PIL import Image
from tiny_sgm import BIGG_WIDTH, CLIP_L_WIDTH, CROSSATTN_WIDTH

from ti_trainer.embeddings.files import load_embedding
from ti_trainer.host import a1111
from ti_trainer.progress import LiveRun
from ti_trainer.ui import create_panel, results_panel, train_handlers
from ti_trainer.ui.train_form import form_fields, form_values, initial_config

NAME = "xlpanel"
WIDTHS = {"clip_l": CLIP_L_WIDTH, "clip_g": BIGG_WIDTH}


@pytest.fixture
def host(webui_sdxl):
    """The WebUI's host services over its SDXL, and three captioned 64 px images in its data folder."""
    rng = np.random.default_rng(0)
    for index, caption in enumerate(["a red square", "a blue circle", "green stripes"]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            webui_sdxl.data_dir / f"{index}.png"
        )
        (webui_sdxl.data_dir / f"{index}.txt").write_text(caption, encoding="utf-8")
    return webui_sdxl, a1111.host_services()


def webui_text_wrappers(model):
    """The WebUI's CLIP-L and bigG wrappers inside sgm's conditioner, each with its own tokenizer."""
    clip_l, clip_g = [embedder for embedder in model.conditioner.embedders if hasattr(embedder, "tokenize")]
    return {"clip_l": clip_l, "clip_g": clip_g}


def test_create_counts_tokens_with_each_webui_tokenizer_and_the_webui_loads_both_tensors(host):
    webui, services = host
    text = "oil painting, richly textured"
    wrappers = webui_text_wrappers(webui.model)
    counts = {key: len(wrapper.tokenize([text])[0]) for key, wrapper in wrappers.items()}
    status = create_panel.init_text_status(services, text, 3)
    assert f"Tokens per text encoder: clip_l {counts['clip_l']}, clip_g {counts['clip_g']}." in status
    assert f"{counts['clip_l']} tokens for 3 vectors" in status

    result, _ = create_panel.create_embedding_job(services, NAME, text, 3, False)
    path = webui.embeddings_dir / f"{NAME}.safetensors"
    assert "ti-trainer-ok" in result and path.name in result
    created = load_embedding(path).vectors
    for key, wrapper in wrappers.items():
        # A1111's rule over the WebUI's own token embeddings of the text: vector i copies token i * tokens // 3.
        with torch.no_grad():
            tokens = wrapper.encode_embedding_init_text(text, 99).float().cpu()
        assert tokens.shape == (counts[key], WIDTHS[key])
        torch.testing.assert_close(created[key], tokens[[i * len(tokens) // 3 for i in range(3)]])
    loaded = webui.db.word_embeddings[NAME]  # the panel refreshed the WebUI's database
    assert (loaded.vectors, loaded.shape) == (3, CROSSATTN_WIDTH) and set(loaded.vec) == set(WIDTHS)
    assert "ti-trainer-warn" in create_panel.name_status(services, NAME)


def our_conditioning(backend, prompt, vectors, height, width):
    with torch.no_grad():
        return backend.unet_conditioning(backend.prompt_encoder([prompt], {NAME: vectors}), height, width)


def test_train_compare_and_use_step_from_the_panels_through_the_webui(host):
    """Create and train from the panels (previews through txt2img), render a 2 steps x 2 prompts grid at 128x64
    through the WebUI's txt2img, and put step 2 into the WebUI's embeddings under a new name."""
    from modules import processing, shared

    webui, services = host
    progress = []
    services.job_progress = lambda done, total, text: progress.append(text)
    before = model_fingerprint(webui.model)
    create_panel.create_embedding_job(services, NAME, "a cat", 2, False)
    config = initial_config(services)  # the WebUI's settings page, then the quick run's settings
    quick = dict(
        embedding_name=NAME,
        data_dir=str(webui.data_dir),
        template="subject_filewords.txt",
        learn_rate="0.05",
        max_steps=4,
        save_every=2,
        preview_every=2,
        preview_steps=2,
        preview_prompt=f"a photo of {NAME}",
        validate_every=0,
        width=64,
        height=64,
        batch_size=2,
        seed=3,
    )
    for key, value in quick.items():
        setattr(config, key, value)
    names = form_fields()
    live = LiveRun()

    result, _ = services.wrap_job(train_handlers.run_training_job)(
        services, live, names, "task(1)", *form_values(config, names)
    )

    assert "finished at 4 steps" in result and live.snapshot().status == "finished"
    assert shared.state.job == ""  # the WebUI's job ended
    assert_same_fingerprint(before, model_fingerprint(webui.model))
    (folder,) = services.log_dir.glob(f"*/{NAME}")
    copies = {
        step: load_embedding(folder / "embeddings" / f"{NAME}-{step}.safetensors").vectors for step in (2, 4)
    }
    assert webui.db.word_embeddings[NAME].vectors == 2 and not webui.db.load_errors
    # The previews went through txt2img with the run's vectors at their step, at the preview size.
    backend = a1111.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 2)
    assert [prompt for prompt, _ in processing.conditioning_log] == [f"a photo of {NAME}"] * 2
    for (prompt, logged), step in zip(processing.conditioning_log, (2, 4)):
        ours = our_conditioning(backend, prompt, copies[step], 64, 64)
        torch.testing.assert_close(logged["crossattn"], ours["crossattn"], rtol=0, atol=1e-6)
        torch.testing.assert_close(logged["vector"], ours["vector"], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (folder / "images").glob("*.png")) == [f"{NAME}-2.png", f"{NAME}-4.png"]

    # The comparison grid, as the Results panel's button runs it: a WebUI job, each cell a txt2img.
    processing.conditioning_log.clear()
    progress.clear()
    database_before = dict(webui.db.word_embeddings)
    label = folder.relative_to(services.log_dir).as_posix()
    width, height, prompts = 128, 64, [f"a cat, {NAME}", f"a house, {NAME}"]
    image, message = services.wrap_job(partial(results_panel.render_comparison, services))(
        str(services.log_dir), label, ["2", "4"], "\n".join(prompts), "", "5", width, height, 2, 7.0
    )

    assert "ti-trainer-ok" in message and "(2 steps x 2 columns)" in message, message
    assert isinstance(image, Image.Image) and image.size[0] > 2 * width and image.size[1] > 2 * height
    (cells,) = (folder / "compare").glob(f"{NAME}-2*/")
    assert sorted(p.name for p in cells.glob("*.png")) == [
        f"step{step}-prompt{column}-seed5.png" for step in (2, 4) for column in (1, 2)
    ]
    assert all(Image.open(p).size == (width, height) for p in cells.glob("*.png"))
    assert progress == [f"Comparison grid: image {done} of 4" for done in range(1, 5)]
    assert shared.state.job == "" and dict(webui.db.word_embeddings) == database_before
    # Each cell's conditioning is the WebUI's at the grid's size (original = target = (64, 128), crop (0, 0)),
    # with its row's step: what training computes for that size and those vectors.
    cells_in_order = [(step, prompt) for step in (2, 4) for prompt in prompts]
    assert [prompt for prompt, _ in processing.conditioning_log] == [prompt for _, prompt in cells_in_order]
    for (step, prompt), (_, logged) in zip(cells_in_order, processing.conditioning_log):
        ours = our_conditioning(backend, prompt, copies[step], height, width)
        torch.testing.assert_close(logged["crossattn"], ours["crossattn"], rtol=0, atol=1e-6)
        torch.testing.assert_close(logged["vector"], ours["vector"], rtol=0, atol=1e-6)
        swapped = our_conditioning(backend, prompt, copies[step], width, height)["vector"]
        assert not torch.allclose(logged["vector"], swapped, atol=1e-4), "the size must be (height, width)"
    assert_same_fingerprint(before, model_fingerprint(webui.model))

    # Which image dominates, measured at a saved step with the WebUI's model, which is left as found.
    table, table_note = services.wrap_job(partial(results_panel.measure_images, services))(
        str(services.log_dir), label, "4"
    )
    assert "At step 4" in table_note and len(table["data"]) == 3
    assert sum(row[3] for row in table["data"]) == pytest.approx(100, abs=0.2)
    assert_same_fingerprint(before, model_fingerprint(webui.model))

    # Use this step: step 2 under a new name, loaded by the WebUI at once with both tensors.
    message = results_panel.use_selected_step(services, str(services.log_dir), label, "2", "xlpicked", False)
    assert "ti-trainer-ok" in message and (webui.embeddings_dir / "xlpicked.safetensors").is_file()
    picked = webui.db.word_embeddings["xlpicked"]
    assert (picked.vectors, picked.shape) == (2, CROSSATTN_WIDTH)
    for key in WIDTHS:
        torch.testing.assert_close(picked.vec[key].cpu(), copies[2][key], rtol=0, atol=0)
        assert not torch.equal(picked.vec[key].cpu(), copies[4][key]), "the chosen step, not the last"
    assert load_embedding(webui.embeddings_dir / "xlpicked.safetensors").step == 2
