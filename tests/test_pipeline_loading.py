"""Loading a user's model as a diffusers folder: the text path must still match A1111's conditioning.

diffusers stores SD 2.x's text encoder cut at OpenCLIP's penultimate layer; the tiny built-in model keeps all
layers and reads the penultimate one, the way the WebUI's ldm model does. Saved as a diffusers folder (with
its last layer dropped, as diffusers' own conversion does), it must give the same conditioning.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ti_trainer.backends.loading import load_backend
from ti_trainer.backends.tiny import build_tiny_components, tiny_backend
from ti_trainer.errors import UserError


def save_as_diffusers_folder(folder, family: str = "sd2", parameterization: str = "v"):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder, tokenizer = build_tiny_components(parameterization, family=family)
    tokenizer.save_files(folder / "vocab")
    pad = "!" if family == "sd2" else "<|endoftext|>"
    hf_tokenizer = CLIPTokenizer(
        str(folder / "vocab" / "vocab.json"), str(folder / "vocab" / "merges.txt"), pad_token=pad
    )
    if family == "sd2":
        text_encoder = copy.deepcopy(text_encoder)
        del getattr(text_encoder, "text_model", text_encoder).encoder.layers[-1]
        text_encoder.config.num_hidden_layers -= 1
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction" if parameterization == "v" else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=hf_tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "model")
    return folder / "model"


PROMPTS = ["a red car by mystyle, art", "Modern CITY at night! by mystyle", "(mystyle:1.2) [painting]"]


@pytest.mark.parametrize(("family", "parameterization"), [("sd2", "v"), ("sd1", "eps")])
def test_folder_model_conditions_like_the_built_in_one(tmp_path, family, parameterization):
    loaded = load_backend(str(save_as_diffusers_folder(tmp_path, family, parameterization)))
    reference = tiny_backend(parameterization, family=family)

    assert loaded.schedule.parameterization == parameterization
    assert torch.allclose(loaded.schedule.alphas_cumprod, reference.schedule.alphas_cumprod.double())
    assert loaded.prompt_encoder.chunker.ids == reference.prompt_encoder.chunker.ids
    vectors = {"mystyle": torch.randn(2, reference.text_width, generator=torch.Generator().manual_seed(0))}
    for backend in (loaded, reference):
        backend.prompt_encoder.chunker.register("mystyle", 2)
    for prompt in PROMPTS:
        assert loaded.tokenize([prompt]) == reference.tokenize([prompt])
        assert torch.allclose(
            loaded.prompt_encoder([prompt], vectors), reference.prompt_encoder([prompt], vectors), atol=1e-5
        ), prompt


def test_missing_model_is_a_message(tmp_path):
    with pytest.raises(UserError, match="Model not found"):
        load_backend(str(tmp_path / "nope.safetensors"))


def test_folder_that_is_not_a_model_is_a_message(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(UserError, match="Could not load"):
        load_backend(str(tmp_path / "junk"))
