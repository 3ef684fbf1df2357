"""The loop end to end on the tiny SD2 model: what changes, what must not, and what it writes."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import draw_dataset

from ti_trainer.embeddings.files import load_embedding, optimizer_state_path
from ti_trainer.errors import UserError
from ti_trainer.training.loop import TrainingHooks, train


def weights_snapshot(backend) -> dict[str, torch.Tensor]:
    modules = {"unet": backend.unet, "vae": backend.vae, "text": backend.text_encoder}
    return {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.state_dict().items()}


def test_only_the_embedding_learns(backend, make_config, tmp_path):
    config = make_config()
    before_vectors = load_embedding(tmp_path / "embeddings" / "testemb.pt").vectors
    before_weights = weights_snapshot(backend)

    result = train(config, backend, TrainingHooks(on_message=lambda text: None))

    after = load_embedding(result.embedding_path)
    assert after.step == 6
    assert not torch.allclose(after.vectors, before_vectors), "training did not change the vectors"
    for key, value in weights_snapshot(backend).items():
        assert torch.equal(value, before_weights[key]), f"model weight {key} changed"
    for module in (backend.unet, backend.vae, backend.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_copies_carry_the_step_in_their_name(backend, make_config):
    result = train(make_config(), backend, TrainingHooks(on_message=lambda text: None))

    copies = sorted((result.log_folder / "embeddings").glob("*.pt"))
    assert [p.name for p in copies] == ["testemb-2.pt", "testemb-4.pt", "testemb-6.pt"]
    for path in copies:
        embedding = load_embedding(path)
        assert embedding.name == path.stem
        assert embedding.step == int(path.stem.rsplit("-", 1)[1])
        assert optimizer_state_path(path).is_file()


def test_loss_csv_and_settings_reproduce_the_run(backend, make_config):
    config = make_config(learn_rate="0.01:3, 0.002")
    result = train(config, backend, TrainingHooks(on_message=lambda text: None))

    with (result.log_folder / "textual_inversion_loss.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "epoch", "epoch_step", "loss", "learn_rate"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["learn_rate"]) for r in rows] == [0.01, 0.01, 0.01, 0.002, 0.002, 0.002]
    # 4 images, batch 2, accumulation 1: two steps per epoch.
    assert [(int(r["epoch"]), int(r["epoch_step"])) for r in rows[:3]] == [(0, 0), (0, 1), (1, 0)]

    settings = json.loads(next(result.log_folder.glob("settings-*.json")).read_text())
    assert settings["embedding_name"] == "testemb" and settings["num_of_dataset_images"] == 4
    assert settings["ti_trainer_config"]["seed"] == 7
    assert settings["ti_trainer_config"] == config.to_dict()


def test_same_seed_same_vectors_and_resume_matches_uninterrupted(backend, make_config, tmp_path):
    straight = train(
        make_config(name="straight", max_steps=6), backend, TrainingHooks(on_message=lambda t: None)
    )

    first = make_config(name="resumed", max_steps=6)
    stops = iter([False] * 4 + [True])
    interrupted = train(
        first, backend, TrainingHooks(on_message=lambda t: None, should_stop=lambda: next(stops))
    )
    assert interrupted.interrupted and interrupted.steps_done == 4
    assert load_embedding(interrupted.embedding_path).step == 4

    resumed = train(
        make_config(name="resumed", create=False, max_steps=6),
        backend,
        TrainingHooks(on_message=lambda t: None),
    )

    a = load_embedding(straight.embedding_path).vectors
    b = load_embedding(resumed.embedding_path).vectors
    assert load_embedding(resumed.embedding_path).step == 6
    assert torch.equal(a, b), "a resumed run must end with the same vectors as one that never stopped"


def test_resume_without_optimizer_state_differs_and_says_so(backend, make_config):
    train(make_config(name="a", max_steps=3), backend, TrainingHooks(on_message=lambda t: None))
    config = make_config(name="a", create=False, max_steps=6)
    optimizer_state_path(__import__("pathlib").Path(config.embeddings_dir) / "a.pt").unlink()
    messages = []
    train(config, backend, TrainingHooks(on_message=messages.append))
    assert any("without optimizer state" in m for m in messages)


def test_accumulated_micro_batches_make_one_step_of_the_epoch(backend, make_config):
    # batch 1 x accumulation 4 sees all 4 images per step: an epoch is one step.
    result = train(
        make_config(batch_size=1, gradient_accumulation=4, max_steps=2),
        backend,
        TrainingHooks(on_message=lambda t: None),
    )
    with (result.log_folder / "textual_inversion_loss.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def every_sample_drawn_alike(monkeypatch, backend, latent_shape: tuple[int, ...], timestep: int) -> None:
    """Give every sample of every micro-batch the same noise and timestep, wherever the loop draws them.

    The loop draws noise and timesteps per micro-batch, so a batch of 2 and two batches of 1 would see
    different draws; with the same draw for every sample, the two only differ in how they are grouped.
    """
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(11))
    real_randn, real_randint = torch.randn, torch.randint

    def randn(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        if shape[1:] == latent_shape:
            return noise.expand(shape).clone()
        return real_randn(*size, **kwargs)

    def randint(*args, **kwargs):
        if len(args) == 3 and args[1] == backend.schedule.num_timesteps:
            return torch.full(tuple(args[2]), timestep, dtype=torch.long)
        return real_randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr(torch, "randint", randint)


def gradients_the_optimizer_sees(monkeypatch) -> list[torch.Tensor]:
    """Record the vectors' gradient at every optimizer step (after accumulation and any clipping)."""
    seen: list[torch.Tensor] = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.extend(p.grad.detach().clone() for group in self.param_groups for p in group["params"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


def test_gradient_accumulation_gives_the_gradient_of_the_larger_batch(
    backend, make_config, tmp_path, monkeypatch
):
    # Two images, one prompt per image (a one-line template), the same noise and timestep for every sample:
    # batch 2 x accumulation 1 and batch 1 x accumulation 2 then compute the same mean loss, so the
    # gradient the optimizer sees must be the same.
    images = draw_dataset(tmp_path / "two", count=2)
    template = tmp_path / "one-line.txt"
    template.write_text("a picture of [name], [filewords]\n", encoding="utf-8")
    every_sample_drawn_alike(monkeypatch, backend, (4, 8, 8), timestep=600)
    seen = gradients_the_optimizer_sees(monkeypatch)
    common = dict(
        data_dir=str(images),
        template=str(template),
        latent_sampling="deterministic",
        max_steps=1,
        save_every=0,
    )
    quiet = TrainingHooks(on_message=lambda t: None)

    train(make_config(name="batch", batch_size=2, gradient_accumulation=1, **common), backend, quiet)
    train(make_config(name="accumulated", batch_size=1, gradient_accumulation=2, **common), backend, quiet)
    train(make_config(name="single", batch_size=1, gradient_accumulation=1, **common), backend, quiet)

    batch, accumulated, single = seen
    assert batch.abs().sum() > 0
    torch.testing.assert_close(accumulated, batch, rtol=1e-4, atol=1e-8)
    # One image alone has another gradient: the check above would catch a step that kept one micro-batch.
    assert not torch.allclose(single, batch, rtol=1e-2)


def test_non_finite_loss_never_reaches_the_vectors(backend, make_config, monkeypatch):
    config = make_config(max_steps=4, save_every=1)
    original = backend.predict
    calls = {"n": 0}

    def sometimes_nan(noisy, t, cond):
        calls["n"] += 1
        out = original(noisy, t, cond)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(backend, "predict", sometimes_nan)
    messages = []
    result = train(config, backend, TrainingHooks(on_message=messages.append))

    assert result.skipped_steps == [3]
    assert any("Step 3" in m and "skipped" in m for m in messages)
    step2 = load_embedding(result.log_folder / "embeddings" / "testemb-2.pt").vectors
    step3 = load_embedding(result.log_folder / "embeddings" / "testemb-3.pt").vectors
    assert torch.equal(step2, step3), "the NaN step must keep the last good vectors"
    assert torch.isfinite(load_embedding(result.embedding_path).vectors).all()


def test_persistent_nan_stops_with_a_message_and_keeps_good_vectors(backend, make_config, monkeypatch):
    config = make_config(max_steps=30)
    monkeypatch.setattr(
        backend, "predict", lambda noisy, t, cond: torch.full_like(noisy, float("nan")) + cond.sum() * 0
    )
    with pytest.raises(UserError, match="non-finite loss"):
        train(config, backend, TrainingHooks(on_message=lambda t: None))
    saved = load_embedding(__import__("pathlib").Path(config.embeddings_dir) / "testemb.pt")
    assert torch.isfinite(saved.vectors).all() and saved.step == 0


@pytest.mark.parametrize(
    ("mode", "measure"),
    [("norm", lambda g: g.norm().item()), ("value", lambda g: g.abs().max().item())],
)
def test_clipping_limits_the_gradient_the_optimizer_sees(backend, make_config, monkeypatch, mode, measure):
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(measure(self.param_groups[0]["params"][0].grad))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    # The clip value is a schedule too: 1e-4 for the first step, then 1e-5.
    config = make_config(clip_grad_mode=mode, clip_grad_value="1e-4:1, 1e-5", max_steps=3)
    train(config, backend, TrainingHooks(on_message=lambda t: None))
    assert len(seen) == 3
    assert seen[0] <= 1e-4 * 1.0001 and seen[0] > 1e-5
    assert all(value <= 1e-5 * 1.0001 for value in seen[1:])


@pytest.mark.parametrize(("family", "parameterization"), [("sd2", "eps"), ("sd2", "v"), ("sd1", "eps")])
def test_sd2_base_sd2_768_v_and_sd1_train(family, parameterization, make_config):
    from ti_trainer.backends.tiny import tiny_backend

    backend = tiny_backend(parameterization, family=family)
    config = make_config(max_steps=2)
    before = load_embedding(__import__("pathlib").Path(config.embeddings_dir) / "testemb.pt").vectors
    result = train(config, backend, TrainingHooks(on_message=lambda t: None))
    after = load_embedding(result.embedding_path)
    assert after.step == 2 and not torch.equal(after.vectors, before)


def test_previews_carry_the_embedding(backend, make_config):
    config = make_config(max_steps=2, preview_every=2, preview_steps=2)
    result = train(config, backend, TrainingHooks(on_message=lambda t: None))

    preview = result.log_folder / "images" / "testemb-2.png"
    carrier = result.log_folder / "image_embeddings" / "testemb-2.png"
    assert preview.is_file() and carrier.is_file()
    from_image = load_embedding(carrier)
    from_copy = load_embedding(result.log_folder / "embeddings" / "testemb-2.pt")
    assert from_image.name == "testemb-2" and from_image.step == 2
    assert torch.allclose(from_image.vectors, from_copy.vectors, atol=1e-6)


def test_an_embedding_in_a_subfolder_is_trained_in_place(backend, make_config, tmp_path):
    config = make_config(max_steps=2)
    top = tmp_path / "embeddings" / "testemb.pt"
    nested = tmp_path / "embeddings" / "styles" / "testemb.pt"
    nested.parent.mkdir()
    top.rename(nested)
    result = train(config, backend, TrainingHooks(on_message=lambda t: None))
    assert result.embedding_path == nested and load_embedding(nested).step == 2
    assert not top.exists(), "no second file of the same name at the top level"
