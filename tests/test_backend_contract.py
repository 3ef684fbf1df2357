"""The backend contract on the standalone (diffusers) backend: every member there, the model family as data,
the overbake range read from the token-embedding matrix, and one training step and one memory plan shared by
the loop, the fit probe and the analysis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ti_trainer.analysis.monitors import monitors_for
from ti_trainer.analysis.norms import ordinary_token_norms, token_norm_range
from ti_trainer.backends.contract import CLIP_H, CLIP_L, Backend, sd_family
from ti_trainer.backends.diffusers_backend import DiffusersBackend
from ti_trainer.backends.tiny import build_tiny_components, tiny_backend
from ti_trainer.diffusion import scaled_linear_schedule
from ti_trainer.memory import plan as memory_plan
from ti_trainer.text.conditioning import InjectingTokenEmbedding, TokenIds
from ti_trainer.training import fit
from ti_trainer.training.loop import TrainingHooks, train
from ti_trainer.training.step import step_loss

NAME = "xyzzy"


@pytest.mark.parametrize(("family", "key"), [("sd1", CLIP_L), ("sd2", CLIP_H)])
def test_the_tiny_backends_fill_the_whole_contract(family, key):
    backend = tiny_backend("eps" if family == "sd1" else "v", family=family)
    assert isinstance(backend, Backend)
    assert backend.family == sd_family(family, 32, latent_channels=4, vae_scale_factor=8)
    assert backend.family.text_encoders[0].key == key and backend.text_width == 32
    assert backend.preferred_precision is None  # fp32 weights: the memory plan chooses
    with backend.training_session(), backend.previewing():  # nothing to borrow or lend: no-ops
        pass


def test_the_overbake_range_is_the_token_embedding_matrixs():
    backend = tiny_backend("v")
    matrix = backend.text_encoder.get_input_embeddings().weight  # text_model.embeddings.token_embedding
    found = ordinary_token_norms(backend)
    assert found == token_norm_range(matrix)
    expected = np.quantile(
        np.linalg.norm(matrix.detach().numpy().astype(np.float64), axis=1), [0.01, 0.5, 0.99]
    )
    assert (found.low, found.median, found.high) == pytest.approx(tuple(expected), rel=1e-6)
    assert found.source == f"all {matrix.shape[0]} tokens"


def test_the_range_is_the_same_for_the_same_matrix_in_any_dtype():
    matrix = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    half = matrix.half()
    assert token_norm_range(half) == token_norm_range(half.float())  # read in fp32, as a host stores it


def test_the_text_encoder_is_left_a_plain_model_between_encodes():
    """The injecting wrapper sits in front of the token embedding only while a prompt encodes (it used to be
    installed for good by a context manager that was entered and never exited)."""
    backend = tiny_backend("v")
    text_encoder = backend.text_encoder
    assert type(text_encoder.get_input_embeddings()) is torch.nn.Embedding
    backend.prompt_encoder.chunker.register(NAME, 1)
    vectors = backend.token_vectors("painting").clone().requires_grad_(True)
    seen = []
    real_forward = InjectingTokenEmbedding.forward

    def forward(self, input_ids):
        seen.append(text_encoder.get_input_embeddings() is self)
        return real_forward(self, input_ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InjectingTokenEmbedding, "forward", forward)
        backend.prompt_encoder([f"a {NAME}"], {NAME: vectors}).sum().backward()
    assert seen == [True] and vectors.grad.abs().sum() > 0
    assert type(text_encoder.get_input_embeddings()) is torch.nn.Embedding
    assert any(key.endswith("embeddings.token_embedding.weight") for key in text_encoder.state_dict())


def test_the_fit_probe_uses_the_familys_latent_channels():
    """A model whose latents have 6 channels is probed with 6-channel latents (not SD's 4)."""
    unet, vae, text_encoder, tokenizer = build_tiny_components("v")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**config, "in_channels": 6, "out_channels": 6})
    ids = TokenIds(start=tokenizer.start_id, end=tokenizer.end_id, pad=0, comma=tokenizer.comma_id)
    backend = DiffusersBackend(
        unet, vae, text_encoder, tokenizer, ids, scaled_linear_schedule("v"), True, "six-channels"
    )
    assert backend.family.latent_channels == 6
    fit.training_step_probe(backend, (8, 8), "fp32")(2)  # a 4-channel latent would not fit conv_in


# --- one training step --------------------------------------------------------------------------------------


def micro_batch(backend, count: int = 3):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(count, 4, 8, 8, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([10, 500, 990][:count])
    prompts = [f"a {NAME} in a field", f"{NAME}, red sky", f"an oil painting by {NAME}"][:count]
    return prompts, latents, noise, timesteps


def test_the_per_sample_losses_average_to_the_training_loss():
    backend = tiny_backend("v")
    backend.prompt_encoder.chunker.register(NAME, 2)
    vectors = {NAME: backend.token_vectors("sunflower field")}
    prompts, latents, noise, timesteps = micro_batch(backend)
    weights = torch.rand(latents.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    with torch.no_grad():
        mean = step_loss(backend, prompts, latents, noise, timesteps, weights, vectors, "fp32")
        each = step_loss(
            backend, prompts, latents, noise, timesteps, weights, vectors, "fp32", per_sample=True
        )
    assert each.shape == (3,) and len(set(each.tolist())) == 3
    assert float(each.mean()) == pytest.approx(float(mean), rel=1e-6)


def test_own_vectors_per_prompt_give_each_sample_its_own_gradient():
    """The per-image report's form of the step: one copy of the vectors per prompt; each copy's gradient is
    that of its sample's loss alone."""
    backend = tiny_backend("v")
    backend.prompt_encoder.chunker.register(NAME, 2)
    base = backend.token_vectors("sunflower field")
    prompts, latents, noise, timesteps = micro_batch(backend)
    copies = [base.clone().requires_grad_(True) for _ in prompts]
    losses = step_loss(
        backend,
        prompts,
        latents,
        noise,
        timesteps,
        None,
        [{NAME: c} for c in copies],
        "fp32",
        per_sample=True,
    )
    losses.sum().backward()
    for index, copy in enumerate(copies):
        alone = base.clone().requires_grad_(True)
        part = slice(index, index + 1)
        loss = step_loss(
            backend, prompts[part], latents[part], noise[part], timesteps[part], None, {NAME: alone}, "fp32"
        )
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(losses[index].detach()), rel=1e-5)
        torch.testing.assert_close(copy.grad, alone.grad, rtol=1e-4, atol=1e-7)


# --- one memory plan per run --------------------------------------------------------------------------------


class PlanWatcher:
    def start(self, context) -> None:
        self.plan = context.memory_plan

    def after_step(self, step, vectors) -> bool:
        return False

    def finish(self, step) -> None:
        pass


def test_a_run_works_its_memory_plan_out_once_and_hands_it_to_the_monitors(backend, make_config, monkeypatch):
    chosen = []
    real_choose = memory_plan.choose_memory_plan

    def choose(*args, **kwargs):
        chosen.append(real_choose(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(memory_plan, "choose_memory_plan", choose)
    config = make_config(max_steps=2, validate_every=1)
    watcher = PlanWatcher()
    hooks = TrainingHooks(on_message=lambda text: None, monitors=[*monitors_for(config, print), watcher])
    train(config, backend, hooks)
    assert len(chosen) == 1
    assert watcher.plan is chosen[0]


def test_asking_for_an_encoder_the_family_does_not_have_is_an_error():
    backend = tiny_backend("v")
    with pytest.raises(ValueError, match="clip_g"):
        backend.token_embedding_weight("clip_g")
