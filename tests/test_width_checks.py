"""An embedding made for another model (vectors of another width) is refused wherever it meets a model or
another embedding, with one message naming the file, its width and family, and what the model needs."""

from __future__ import annotations

import pytest
import torch
from test_non_finite_vectors import fake_run

from ti_trainer.analysis import compare
from ti_trainer.analysis.image_report import report_for_step
from ti_trainer.analysis.use_step import use_step
from ti_trainer.cli import main as cli
from ti_trainer.embeddings.checks import require_width
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.errors import UserError


def test_the_message_names_file_widths_families_and_what_to_do():
    with pytest.raises(UserError) as error:
        require_width("embeddings/style.pt", 768, 1024)
    assert str(error.value).startswith(
        "style.pt holds 768-wide vectors (an SD 1.x embedding); the loaded model needs 1024 (SD 2.x). "
        "Use an embedding made for this model."
    )
    require_width("style.pt", 1024, 1024)  # the right width passes


@pytest.fixture
def mixed_run(tmp_path, backend):
    """A run folder whose step 6 copy was written by a run of the same name on an SD 1.x model."""
    width = backend.text_width
    copies = {step: Embedding("emb", torch.full((1, width), 0.1 * step), step) for step in (2, 4)}
    copies[6] = Embedding("emb", torch.zeros(1, 768), 6)
    return fake_run(tmp_path / "logs" / "2024-01-01" / "emb", "emb", copies)


def never_render(request):
    raise AssertionError("nothing is rendered when a copy does not fit the model")


def test_compare_refuses_a_copy_of_another_width_before_rendering(mixed_run, backend):
    settings = compare.CompareSettings(prompts=["a cat, [name]"])
    with pytest.raises(UserError, match=r"emb-6\.pt holds 768-wide vectors \(an SD 1.x embedding\)"):
        compare.render_grid(mixed_run, settings, never_render, steps=[2, 6], family=backend.family)
    # Without the model's width the copies are checked against each other.
    with pytest.raises(UserError, match="the other copies of this run hold"):
        compare.render_grid(mixed_run, settings, never_render, steps=[2, 6])


def test_compare_names_an_sdxl_copy_met_by_an_sd_model(tmp_path, backend):
    from ti_trainer.embeddings.files import save_embedding

    run = fake_run(tmp_path / "run", "emb", {})
    sdxl = Embedding("emb", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, step=2)
    save_embedding(sdxl, run.root / "embeddings" / "emb-2.safetensors")
    settings = compare.CompareSettings(prompts=["a cat, [name]"])
    with pytest.raises(UserError, match=r"emb-2\.safetensors is an SDXL embedding .*clip_l 768, clip_g 1280"):
        compare.render_grid(run, settings, never_render, steps=[2], family=backend.family)


def test_cli_compare_reports_the_odd_copy_without_a_traceback(mixed_run, capsys):
    assert cli.main(["compare", str(mixed_run.root), "--steps", "6", "--prompt", "a cat, [name]"]) == 2
    err = capsys.readouterr().err
    assert "emb-6.pt holds 768-wide vectors" in err and "Traceback" not in err


def test_use_step_refuses_a_copy_of_another_width(mixed_run, tmp_path):
    embeddings = tmp_path / "embeddings"
    with pytest.raises(UserError, match=r"emb-6\.pt holds 768-wide.*other copies of this run hold"):
        use_step(mixed_run, 6, "picked", embeddings)
    assert not (embeddings / "picked.pt").exists()
    assert use_step(mixed_run, 4, "picked", embeddings).is_file()


def test_image_report_refuses_a_copy_of_another_width(mixed_run, backend):
    with pytest.raises(UserError, match=r"emb-6\.pt holds 768-wide"):
        report_for_step(mixed_run, backend, 6)


def test_training_refuses_an_initial_embedding_of_another_width(backend, make_config, tmp_path):
    from ti_trainer.embeddings.files import save_embedding
    from ti_trainer.training.loop import TrainingHooks, train

    config = make_config(name="sd1", create=False)
    save_embedding(Embedding("sd1", torch.zeros(1, 768)), tmp_path / "embeddings" / "sd1.pt")
    with pytest.raises(UserError, match=r"sd1\.pt holds 768-wide vectors \(an SD 1.x embedding\)"):
        train(config, backend, TrainingHooks(on_message=lambda t: None))
