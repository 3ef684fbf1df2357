"""A run killed between a save and its preview: the resumed run renders that step's preview first."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ti_trainer.training.loop import TrainingHooks, train


def counting(backend, rendered: list):
    def render(request):
        rendered.append(request)
        return backend.render(request)

    return render


def pixels_and_text(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy(), image.text.get("parameters")


def test_a_missing_preview_of_the_resumed_step_is_rendered_first(backend, make_config):
    config = make_config(max_steps=4, save_every=2, preview_every=2, preview_steps=2)
    first = train(config, backend, TrainingHooks(on_message=lambda t: None))
    preview = first.log_folder / "images" / "testemb-4.png"
    carrier = first.log_folder / "image_embeddings" / "testemb-4.png"
    original = pixels_and_text(preview)
    # As if the run had been killed after saving step 4 and before rendering its preview.
    preview.unlink()
    carrier.unlink()

    rendered, messages = [], []
    resumed = make_config(create=False, max_steps=6, save_every=2, preview_every=2, preview_steps=2)
    train(
        resumed,
        backend,
        TrainingHooks(on_message=messages.append, render_preview=counting(backend, rendered)),
    )

    assert preview.is_file() and carrier.is_file()
    again = pixels_and_text(preview)
    assert again[1] == original[1], "the same prompt as the step drew in the first run"
    assert np.array_equal(again[0], original[0]), "the image the first run would have made"
    assert len(rendered) == 2  # step 4's, then step 6's
    assert any("preview of step 4" in message for message in messages)


def test_an_existing_preview_is_not_rendered_again(backend, make_config):
    config = make_config(max_steps=4, save_every=2, preview_every=2, preview_steps=2)
    train(config, backend, TrainingHooks(on_message=lambda t: None))

    rendered = []
    resumed = make_config(create=False, max_steps=6, save_every=2, preview_every=2, preview_steps=2)
    train(
        resumed, backend, TrainingHooks(on_message=lambda t: None, render_preview=counting(backend, rendered))
    )
    assert len(rendered) == 1  # step 6 only
