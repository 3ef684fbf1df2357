"""Training on the tiny SDXL model end to end: only the embedding's two tensors learn, a resumed run ends
bit-identical, the monitors measure each encoder on its own, and bad input is refused before any work."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import quick_config
from PIL import Image

from ti_trainer.analysis.monitors import monitors_for
from ti_trainer.analysis.norms import token_norm_range
from ti_trainer.analysis.run_files import NORMS_CSV, SUMMARY_JSON, RunInfo, read_rows
from ti_trainer.analysis.use_step import use_step
from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.backends.tiny_xl import tiny_xl_backend
from ti_trainer.cli import main as cli_main
from ti_trainer.embeddings.create import create_embedding, init_text_report, init_token_counts
from ti_trainer.embeddings.embedding import Embedding, vectors_from_init
from ti_trainer.embeddings.files import load_embedding, save_embedding
from ti_trainer.errors import UserError
from ti_trainer.training import fit
from ti_trainer.training.buckets import aspect_buckets
from ti_trainer.training.loop import TrainingHooks, train


@pytest.fixture(scope="module")
def xl():
    return tiny_xl_backend()


def quiet(messages: list | None = None) -> TrainingHooks:
    return TrainingHooks(on_message=(messages.append if messages is not None else lambda text: None))


def weights(backend) -> dict[str, torch.Tensor]:
    modules = {
        "unet": backend.unet,
        "vae": backend.vae,
        "clip_l": backend.text_encoder,
        "clip_g": backend.text_encoder_2,
    }
    return {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.state_dict().items()}


def test_create_starts_each_encoder_from_its_own_token_vectors(xl, tmp_path):
    path = create_embedding(xl, "xlstyle", "red painting style", 4, tmp_path)
    assert path.name == "xlstyle.safetensors"
    created = load_embedding(path)
    tokens = xl.token_vectors("red painting style")
    for key, width in (("clip_l", 32), ("clip_g", 48)):
        assert created.vectors[key].shape == (4, width)
        assert torch.equal(created.vectors[key], vectors_from_init(tokens[key], 4, width)), key
    assert not torch.equal(created.vectors["clip_l"][:, :32], created.vectors["clip_g"][:, :32])
    count = len(xl.tokenize(["red painting style"])[0])
    assert init_token_counts(xl, "red painting style") == {"clip_l": count, "clip_g": count}
    assert f"Tokens per text encoder: clip_l {count}, clip_g {count}." in init_text_report(
        xl, "red painting style", 4
    )
    blank = load_embedding(create_embedding(xl, "blank", "", 2, tmp_path))
    assert not blank.vectors["clip_l"].any() and not blank.vectors["clip_g"].any()


def test_only_the_embedding_learns_and_each_encoder_is_measured_on_its_own(xl, tmp_path):
    config = quick_config(tmp_path, xl, save_format="safetensors", validate_every=2)
    before = load_embedding(tmp_path / "embeddings" / "testemb.safetensors").vectors
    snapshot = weights(xl)
    result = train(config, xl, TrainingHooks(on_message=lambda t: None, monitors=monitors_for(config, print)))

    after = load_embedding(result.embedding_path)
    assert after.step == 6 and after.per_encoder
    for key in ("clip_l", "clip_g"):
        assert not torch.allclose(after.vectors[key], before[key]), f"{key} did not learn"
    for key, value in weights(xl).items():
        assert torch.equal(value, snapshot[key]), f"model weight {key} changed"
    for module in (xl.unet, xl.vae, xl.text_encoder, xl.text_encoder_2):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())

    rows = read_rows(result.log_folder / NORMS_CSV)
    assert list(rows[0]) == [
        "step",
        "clip_l_vector_0",
        "clip_l_vector_1",
        "clip_g_vector_0",
        "clip_g_vector_1",
    ]
    last = rows[-1]
    assert float(last["clip_g_vector_1"]) == pytest.approx(float(after.vectors["clip_g"][1].norm()), rel=1e-6)
    ranges = json.loads((result.log_folder / SUMMARY_JSON).read_text())["norm_ranges"]
    for key in ("clip_l", "clip_g"):  # each against its own encoder's ordinary words
        assert ranges[key] == token_norm_range(xl.token_embedding_weight(key)).to_dict()
    run = RunInfo.open(result.log_folder)
    assert run.norms("clip_g")[1][-1] == [float(last["clip_g_vector_0"]), float(last["clip_g_vector_1"])]
    assert (result.log_folder / "image_report.csv").is_file() and (
        result.log_folder / "validation_loss.csv"
    ).is_file()
    copies = sorted(p.name for p in (result.log_folder / "embeddings").glob("*.safetensors"))
    assert copies == ["testemb-2.safetensors", "testemb-4.safetensors", "testemb-6.safetensors"]


def test_a_resumed_run_ends_bit_identical(xl, tmp_path):
    straight = train(quick_config(tmp_path, xl, name="straight", save_format="safetensors"), xl, quiet())
    stops = iter([False] * 4 + [True])
    first = train(
        quick_config(tmp_path, xl, name="resumed", save_format="safetensors"),
        xl,
        TrainingHooks(on_message=lambda t: None, should_stop=lambda: next(stops)),
    )
    assert first.interrupted and load_embedding(first.embedding_path).step == 4
    messages: list[str] = []
    resumed = train(
        quick_config(tmp_path, xl, name="resumed", create=False, save_format="safetensors"),
        xl,
        quiet(messages),
    )
    assert any("Loaded optimizer state" in m for m in messages)
    a, b = load_embedding(straight.embedding_path), load_embedding(resumed.embedding_path)
    assert b.step == 6
    for key in ("clip_l", "clip_g"):
        assert torch.equal(a.vectors[key], b.vectors[key]), key

    # Use-step: the copy of step 4 goes into an embeddings folder with its step and both tensors.
    picked = use_step(RunInfo.open(resumed.log_folder), 4, "picked", tmp_path / "chosen")
    chosen = load_embedding(picked)
    copy = load_embedding(resumed.log_folder / "embeddings" / "resumed-4.safetensors")
    assert picked.name == "picked.safetensors" and chosen.step == 4
    assert all(torch.equal(chosen.vectors[key], copy.vectors[key]) for key in ("clip_l", "clip_g"))


def test_a_pt_save_format_becomes_safetensors_with_the_reason(xl, tmp_path):
    messages: list[str] = []
    result = train(quick_config(tmp_path, xl, max_steps=2, save_format="pt"), xl, quiet(messages))
    assert result.embedding_path.suffix == ".safetensors" and load_embedding(result.embedding_path).step == 2
    assert any("Saving as .safetensors, not .pt" in m for m in messages)


def test_an_sd2_embedding_on_sdxl_is_refused_before_any_work(xl, tmp_path):
    config = quick_config(tmp_path, xl, create=False, save_format="safetensors")
    save_embedding(Embedding("testemb", torch.zeros(2, 32)), tmp_path / "embeddings" / "testemb.pt")
    with pytest.raises(UserError) as raised:
        train(config, xl, quiet())
    assert "testemb.pt holds one set of 32-wide vectors" in str(raised.value) and "SDXL" in str(raised.value)
    assert not (tmp_path / "logs").exists(), "refused before a log folder was made"


def test_an_sdxl_embedding_on_sd2_is_refused_before_any_work(xl, tmp_path):
    sd2 = tiny_backend("v")
    create_embedding(xl, "testemb", "painting", 2, tmp_path / "embeddings")
    config = quick_config(tmp_path, sd2, create=False)
    with pytest.raises(UserError, match=r"testemb\.safetensors is an SDXL embedding .* SD 2\.x"):
        train(config, sd2, quiet())


def test_the_fit_probe_runs_a_real_sdxl_step(xl):
    step = fit.training_step_probe(xl, (8, 8), "fp32", num_vectors=2)
    assert fit.fits(step, 2)
    assert "tiprobevectors" not in xl.prompt_encoder.chunker._names  # nothing of the probe stays registered


# The landscape half of the sizes SDXL was trained on (the SDXL paper's bucket table), up to ratio 2.5.
SDXL_TRAINED_SIZES = {
    (1024, 1024), (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640),
}  # fmt: skip
SDXL_USUAL_SIZES = {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)}


def test_sdxl_buckets_are_its_usual_sizes_around_one_megapixel(xl):
    buckets = aspect_buckets(1024, 1024, xl.family.bucket_max_ratio)
    wide = {size for size in buckets if size[0] >= size[1]}
    assert SDXL_USUAL_SIZES <= wide <= SDXL_TRAINED_SIZES
    assert {(h, w) for w, h in wide} <= set(buckets), "portrait buckets too"
    assert all(abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.07 for w, h in wide)
    # SD 1.x/2.x keep their 2:1 limit, so 1536x640 is SDXL's alone.
    assert (1536, 640) not in aspect_buckets(1024, 1024, tiny_backend("v").family.bucket_max_ratio)


def test_the_backend_fills_the_contract_and_the_estimate_reads_both_text_encoders(xl):
    from ti_trainer.backends.contract import Backend, sdxl_family
    from ti_trainer.config import TrainConfig
    from ti_trainer.vram.architectures import architecture_of_backend
    from ti_trainer.vram.for_config import estimate_for_config, summary

    assert isinstance(xl, Backend)
    assert xl.family == sdxl_family(32, 48) and xl.text_width == 80 and xl.family.extra_conditioning
    with pytest.raises(ValueError):
        xl.token_embedding_weight("clip_h")
    architecture = architecture_of_backend(xl)
    assert len(architecture.text_encoders) == 2 and architecture.pooled_text
    assert architecture.text_layer == "penultimate"
    assert "fits" in summary(estimate_for_config(TrainConfig(embedding_name="x", width=64, height=64), xl, 2))


def test_the_demo_trains_the_tiny_sdxl_model_end_to_end(tmp_path, capsys):
    from ti_trainer.cli.demo import DEMO_NAME, run_demo

    log = run_demo(tmp_path / "demo", steps=10, model="tiny-sdxl")
    final = load_embedding(tmp_path / "demo" / "embeddings" / f"{DEMO_NAME}.safetensors")
    assert final.step == 10 and final.per_encoder
    assert [p.name for p in (log / "embeddings").glob("*.safetensors")] == [f"{DEMO_NAME}-10.safetensors"]
    for name in ("textual_inversion_loss.csv", "validation_loss.csv", NORMS_CSV, "image_report.csv"):
        assert (log / name).is_file(), name
    settings = json.loads(next(log.glob("settings-*.json")).read_text())
    assert settings["model_name"] == "tiny-sdxl"
    # The next command it suggests works on its run (one prompt and sampling step here, to keep it quick).
    (suggested,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Next: ")]
    args = shlex.split(suggested.removeprefix("Next: python -m ti_trainer ").split("   (")[0])
    assert args == ["compare", str(log)]  # compare renders with the run's own tiny model
    assert cli_main.main([*args, "--prompt", "a cat, [name]", "--sampler-steps", "1"]) == 0
    assert Path(capsys.readouterr().out.strip().splitlines()[-1]).parent == log / "compare"


def test_compare_and_use_step_from_the_cli_on_an_sdxl_run(xl, tmp_path, capsys):
    """`compare` renders the run's copies with the tiny SDXL (rows = steps, columns = prompts, at the size
    asked for); `use-step` installs a copy with both tensors; an SD model asked for is refused with a
    message naming the SDXL copy."""
    run = train(quick_config(tmp_path, xl, max_steps=4, save_format="safetensors"), xl, quiet()).log_folder
    code = cli_main.main(
        [
            "compare", str(run), "--model", "tiny-sdxl", "--device", "cpu", "--steps", "2, 4",
            "--prompt", "a cat, [name]", "--prompt", "a house, [name]", "--width", "128", "--height", "64",
            "--sampler-steps", "2",
        ]
    )  # fmt: skip
    assert code == 0
    grid_path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert grid_path.parent == run / "compare"
    with Image.open(grid_path) as grid:
        info = json.loads(grid.text["ti_trainer_compare"])
        assert grid.size[0] > 2 * 128 and grid.size[1] > 2 * 64
    assert info["rows"] == ["step 2", "step 4"] and info["columns"] == ["a cat, testemb", "a house, testemb"]
    (cells,) = [folder for folder in (run / "compare").iterdir() if folder.is_dir()]
    sizes = sorted((p.name, Image.open(p).size) for p in cells.glob("*.png"))
    assert sizes == [
        (f"step{s}-prompt{p}-seed{info['seeds'][0]}.png", (128, 64)) for s in (2, 4) for p in (1, 2)
    ]

    assert cli_main.main(["use-step", str(run), "2", "picked"]) == 0
    installed = tmp_path / "embeddings" / "picked.safetensors"  # the run's embeddings folder
    assert str(installed) in capsys.readouterr().out
    chosen, copy = load_embedding(installed), load_embedding(run / "embeddings" / "testemb-2.safetensors")
    assert chosen.step == 2
    for key in ("clip_l", "clip_g"):
        assert torch.equal(chosen.vectors[key], copy.vectors[key]), key

    assert (
        cli_main.main(["compare", str(run), "--model", "tiny", "--steps", "2", "--prompt", "a cat, [name]"])
        == 2
    )
    err = capsys.readouterr().err
    assert "trained on tiny-sdxl" in err and "testemb-2.safetensors is an SDXL embedding" in err
    assert "Traceback" not in err
