"""The tiny SDXL model as diffusers saves and reads SDXL: a user's diffusers folder loads as the SDXL backend
with the same conditioning, and our embedding files go into diffusers' `load_textual_inversion` once per
text encoder (clip_l with `text_encoder`/`tokenizer`, clip_g with `text_encoder_2`/`tokenizer_2`)."""

from __future__ import annotations

import pytest
import torch

from ti_trainer.backends.diffusers_xl_backend import DiffusersXLBackend, size_conditioning
from ti_trainer.backends.loading import is_sdxl_model, load_backend
from ti_trainer.backends.tiny_xl import build_tiny_xl_components, tiny_xl_backend
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import save_embedding

PROMPTS = [
    "a red car by mystyle, art",
    "Modern CITY at night! by mystyle",
    "(mystyle:1.2) [painting] BREAK sky",
]


def tiny_xl_pipeline(folder):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder, text_encoder_2, tokenizer = build_tiny_xl_components()
    tokenizer.save_files(folder / "vocab")
    vocab, merges = str(folder / "vocab" / "vocab.json"), str(folder / "vocab" / "merges.txt")
    # As SDXL's own: CLIP-L's tokenizer pads with the end token, bigG's with "!" (id 0).
    hf_tokenizer = CLIPTokenizer(vocab, merges, pad_token="<|endoftext|>")
    hf_tokenizer_2 = CLIPTokenizer(vocab, merges, pad_token="!")
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=hf_tokenizer,
        tokenizer_2=hf_tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    tiny_xl_pipeline(folder).save_pretrained(folder / "model")
    return folder / "model"


def test_a_diffusers_sdxl_folder_loads_as_the_sdxl_backend_with_the_same_conditioning(saved_folder):
    assert is_sdxl_model(saved_folder)
    loaded = load_backend(str(saved_folder), device="cpu")
    reference = tiny_xl_backend()
    assert isinstance(loaded, DiffusersXLBackend) and loaded.family == reference.family
    assert loaded.schedule.parameterization == "eps"
    assert torch.allclose(loaded.schedule.alphas_cumprod, reference.schedule.alphas_cumprod.double())
    assert loaded.prompt_encoder.chunker.ids == reference.prompt_encoder.chunker.ids
    assert [path.pad for path in loaded.prompt_encoder.paths] == [reference.prompt_encoder.chunker.ids.end, 0]
    vectors = {"mystyle": reference.family.zero_vectors(2)}
    for key, tensor in vectors["mystyle"].items():
        tensor.normal_(generator=torch.Generator().manual_seed(len(key)))
    for backend in (loaded, reference):
        backend.prompt_encoder.chunker.register("mystyle", 2)
    for prompt in PROMPTS:
        ours, theirs = loaded.prompt_encoder([prompt], vectors), reference.prompt_encoder([prompt], vectors)
        assert torch.allclose(ours.hidden, theirs.hidden, atol=1e-5), prompt
        assert torch.allclose(ours.pooled, theirs.pooled, atol=1e-5), prompt


def test_the_size_conditioning_is_what_diffusers_sdxl_pipeline_generates_with(saved_folder):
    """Original = target = the image's (height, width), crop (0, 0): the WebUI's and diffusers' default for a
    generation of that size, in the UNet's order."""
    pipe = tiny_xl_pipeline(saved_folder.parent / "again")
    height, width = 64, 96
    expected = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    assert torch.equal(torch.tensor([size_conditioning(height, width)], dtype=torch.float32), expected)


def test_our_file_goes_into_diffusers_load_textual_inversion_once_per_encoder(tmp_path):
    pipe = tiny_xl_pipeline(tmp_path)
    backend = tiny_xl_backend()
    vectors = backend.token_vectors("red painting")  # 2 tokens: each encoder's own rows
    vectors = {key: value * 1.5 for key, value in vectors.items()}
    path = save_embedding(Embedding("mystyle", vectors, 10), tmp_path / "mystyle.safetensors")

    from safetensors.torch import load_file

    state_dict = load_file(str(path))
    pipe.load_textual_inversion(
        state_dict["clip_g"], token="mystyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    pipe.load_textual_inversion(
        state_dict["clip_l"], token="mystyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    for key, encoder, tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        ids = tokenizer.convert_tokens_to_ids(["mystyle", "mystyle_1"])
        rows = encoder.get_input_embeddings().weight[ids]
        assert torch.equal(rows, vectors[key]), key
