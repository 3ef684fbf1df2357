"""--save-format safetensors: the trained file, its step copies and the choice among them are .safetensors,
the run resumes from them, and the files load where the README says they do."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_loading import save_as_diffusers_folder

from ti_trainer.analysis.run_files import RunInfo
from ti_trainer.analysis.use_step import use_step
from ti_trainer.cli.main import main
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import existing_embedding_file
from ti_trainer.embeddings.files import load_embedding, optimizer_state_path
from ti_trainer.errors import UserError
from ti_trainer.training.loop import TrainingHooks, train


def test_a_safetensors_run_writes_resumes_and_chooses_in_safetensors(make_config, backend, tmp_path):
    messages = []
    hooks = TrainingHooks(on_message=messages.append)
    first = train(make_config(save_format="safetensors", max_steps=4), backend, hooks)

    embeddings = tmp_path / "embeddings"
    assert first.embedding_path == embeddings / "testemb.safetensors"
    assert not (embeddings / "testemb.pt").exists(), "one name, one file: the .pt it started from is replaced"
    assert not optimizer_state_path(embeddings / "testemb.pt").exists()
    assert optimizer_state_path(first.embedding_path).is_file()
    assert load_embedding(first.embedding_path).step == 4
    assert any("into testemb.safetensors" in m and "testemb.pt" in m for m in messages)

    run = RunInfo.open(first.log_folder)
    assert {step: path.name for step, path in run.saved_steps().items()} == {
        2: "testemb-2.safetensors",
        4: "testemb-4.safetensors",
    }
    assert [load_embedding(path).step for path in run.saved_steps().values()] == [2, 4]

    messages.clear()
    resumed = train(make_config(create=False, save_format="safetensors", max_steps=6), backend, hooks)
    assert (
        resumed.steps_done == 6 and existing_embedding_file(embeddings, "testemb") == resumed.embedding_path
    )
    assert "Loaded optimizer state from testemb.safetensors.optim" in messages

    chosen = use_step(run, 2, "picked", embeddings)
    assert chosen == embeddings / "picked.safetensors" and load_embedding(chosen).step == 2


def test_the_default_stays_pt(make_config, backend, tmp_path):
    result = train(make_config(max_steps=2), backend, TrainingHooks(on_message=lambda t: None))
    assert result.embedding_path.suffix == ".pt"
    assert [path.suffix for path in RunInfo.open(result.log_folder).saved_steps().values()] == [".pt"]


def test_cli_offers_the_format_and_refuses_others(tmp_path, dataset, capsys):
    emb = str(tmp_path / "emb")
    assert main(["create", "cliformat", "--embeddings-dir", emb]) == 0
    common = ["--data", str(dataset), "--embeddings-dir", emb, "--log-dir", str(tmp_path / "logs")]
    sizes = [
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--validate-every",
        "0",
        "--preview-every",
        "0",
    ]
    assert main(["train", "cliformat", *common, *sizes, "--save-format", "safetensors"]) == 0
    assert (tmp_path / "emb" / "cliformat.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["train", "cliformat", *common, "--save-format", "png"])
    with pytest.raises(UserError, match="Save format"):
        TrainConfig.from_dict({"embedding_name": "x", "save_format": "bin"}).validate()


@pytest.mark.parametrize("save_format", ["pt", "safetensors"])
def test_diffusers_loads_both_formats(make_config, backend, tmp_path, save_format):
    from diffusers import StableDiffusionPipeline

    result = train(
        make_config(save_format=save_format, max_steps=2), backend, TrainingHooks(on_message=lambda t: None)
    )
    pipe = StableDiffusionPipeline.from_pretrained(str(save_as_diffusers_folder(tmp_path / "model")))
    pipe.load_textual_inversion(str(result.embedding_path), token="<testemb>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<testemb>", "<testemb>_1"])  # diffusers' names for 2 vectors
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids].detach()
    assert torch.allclose(loaded, load_embedding(result.embedding_path).vectors)
