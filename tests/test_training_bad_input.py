"""Bad input gets a clear message before any training step runs (DESIGN invariant 6)."""

from __future__ import annotations

import pytest
import torch

from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import save_embedding
from ti_trainer.errors import UserError
from ti_trainer.training.loop import TrainingHooks, train


def no_step_allowed(report):
    raise AssertionError("a training step ran although the input was bad")


def run(config, backend):
    return train(config, backend, TrainingHooks(on_step=no_step_allowed, on_message=lambda t: None))


def test_empty_folder(backend, make_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        run(make_config(data_dir=str(tmp_path / "empty")), backend)


def test_folder_of_only_unreadable_files_names_each(backend, make_config, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "one.png").write_bytes(b"not an image at all")
    (folder / "two.jpg").write_bytes(b"")
    with pytest.raises(UserError) as error:
        run(make_config(data_dir=str(folder)), backend)
    assert "one.png" in str(error.value) and "two.jpg" in str(error.value)


def test_template_without_name_is_refused_before_training(backend, make_config, tmp_path):
    template = tmp_path / "no_name.txt"
    template.write_text("a painting of [filewords]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"\[name\]"):
        run(make_config(template=str(template)), backend)


def test_template_lines_without_name_are_left_out_and_named_before_training(backend, make_config, tmp_path):
    # With one image per step, a step that drew a line without [name] had no gradient at all and stopped the
    # run with torch's "element 0 of tensors does not require grad".
    template = tmp_path / "mostly_plain.txt"
    template.write_text("a plain photo\n[filewords], [name]\nanother plain photo\nplain again\n", "utf-8")
    events = []
    result = train(
        make_config(template=str(template), batch_size=1, max_steps=8),
        backend,
        TrainingHooks(on_message=events.append, on_step=events.append),
    )
    assert result.steps_done == 8
    (warning,) = [event for event in events if "mostly_plain.txt" in str(event)]
    assert "Lines 1, 3, 4" in warning and "left out" in warning
    assert events.index(warning) < min(i for i, event in enumerate(events) if not isinstance(event, str))


def test_name_that_tokenizes_into_its_neighbours_is_refused(backend, make_config, tmp_path):
    template = tmp_path / "glued.txt"
    template.write_text("art by [name]s\n", encoding="utf-8")
    with pytest.raises(UserError, match="not recognised"):
        run(make_config(template=str(template)), backend)


@pytest.mark.parametrize("name", ["../evil", "sub/dir", "back\\slash", ""])
def test_names_with_path_separators_or_empty(backend, make_config, name):
    with pytest.raises(UserError):
        run(make_config(name=name, create=False), backend)


def test_missing_embedding_says_to_create_it(backend, make_config):
    with pytest.raises(UserError, match="Create it first"):
        run(make_config(name="never-created", create=False), backend)


@pytest.mark.parametrize("rate", ["abc", "0.005:x", "0.005:100, 1e-3:50", "-1", ""])
def test_learning_rate_that_does_not_parse(backend, make_config, rate):
    with pytest.raises(UserError, match="0.005:100, 1e-3:1000, 1e-5"):
        run(make_config(learn_rate=rate), backend)


def test_embedding_for_another_model_width(backend, make_config, tmp_path):
    config = make_config(create=False, name="sd1emb")
    save_embedding(Embedding("sd1emb", torch.zeros(1, 768)), tmp_path / "embeddings" / "sd1emb.pt")
    with pytest.raises(UserError, match="768"):
        run(config, backend)


def test_already_trained_past_max_steps(backend, make_config, tmp_path):
    config = make_config(create=False, name="done", max_steps=5)
    save_embedding(
        Embedding("done", torch.zeros(1, backend.text_width), step=5), tmp_path / "embeddings" / "done.pt"
    )
    with pytest.raises(UserError, match="already been trained for 5 steps"):
        run(config, backend)


@pytest.mark.parametrize(
    ("field", "value"),
    [("batch_size", 0), ("gradient_accumulation", 0), ("max_steps", 0), ("width", 100), ("tag_dropout", 1.5)],
)
def test_invalid_numbers(backend, make_config, field, value):
    with pytest.raises(UserError):
        run(make_config(**{field: value}), backend)


def test_unknown_template_lists_the_available_ones(backend, make_config):
    with pytest.raises(UserError, match="style_filewords.txt"):
        run(make_config(template="nope.txt"), backend)


def test_xformers_chosen_but_missing_is_reported_before_training(backend, make_config, monkeypatch):
    from ti_trainer.memory import plan as memory_plan

    monkeypatch.setattr(memory_plan, "xformers_available", lambda: False)
    encoded = []
    monkeypatch.setattr(backend, "encode_images", lambda pixels: encoded.append(1))
    with pytest.raises(UserError, match="xformers"):
        run(make_config(attention="xformers"), backend)
    assert not encoded, "no image may be encoded before the message"
