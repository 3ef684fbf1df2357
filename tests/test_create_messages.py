"""`create` on the CLI says which initialization tokens each vector starts from (the Create panel's words),
and that an embedding made without --model is for the built-in tiny demo model."""

from __future__ import annotations

import pytest
import torch
from test_pipeline_loading import save_as_diffusers_folder

from ti_trainer.cli.main import main
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.embeddings.init_text import init_mapping, vector_sources


def test_create_prints_which_token_each_vector_starts_from(tmp_path, backend, capsys):
    text = "oil painting, richly textured"
    assert (
        main(["create", "mapped", "--init-text", text, "--vectors", "3", "--embeddings-dir", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    ids = backend.prompt_encoder.chunker.tokenize([text])[0]
    assert init_mapping(len(ids), 3) in out  # the sentence the Create panel shows
    tokens = backend.token_vectors(text)
    vectors = load_embedding(tmp_path / "mapped.pt").vectors
    for vector, token in enumerate(vector_sources(len(ids), 3)):
        # the printed source is the token the file's vector really holds
        assert f"vector {vector + 1} <- token {token + 1} " in out
        assert torch.equal(vectors[vector], tokens[token])


def test_create_without_init_text_says_the_vectors_start_at_zero(tmp_path, capsys):
    assert (
        main(["create", "blank", "--init-text", "", "--vectors", "2", "--embeddings-dir", str(tmp_path)]) == 0
    )
    assert "the vectors start at zero" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("tokens", "vectors", "expected"), [(2, 4, [0, 0, 1, 1]), (4, 2, [0, 2]), (0, 3, [])]
)
def test_vector_sources_follow_a1111(tokens, vectors, expected):
    assert vector_sources(tokens, vectors) == expected


def test_create_without_model_says_the_file_is_for_the_tiny_demo_model(tmp_path, capsys):
    assert main(["create", "demoonly", "--embeddings-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "built-in tiny demo model" in err and "--model path/to/model.safetensors" in err


def test_create_with_a_model_has_no_tiny_model_note(tmp_path, capsys):
    model = save_as_diffusers_folder(tmp_path)
    assert main(["create", "real", "--model", str(model), "--embeddings-dir", str(tmp_path / "emb")]) == 0
    assert "tiny demo model" not in capsys.readouterr().err
