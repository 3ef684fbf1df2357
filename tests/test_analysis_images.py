"""Which image dominates: per-image loss and gradient share on the tiny SD2 model, with a planted outlier.

The tiny model's VAE has random weights and maps every picture to nearly the same latent, so the outlier is
planted where the UNet sees images: in latent space (as a real SD VAE places a photo unlike the others).
"""

from __future__ import annotations

import pytest
import torch

from ti_trainer.analysis.fixed_batch import probe_batch, sample_gradients
from ti_trainer.analysis.image_report import dominant, image_rows, write_image_report
from ti_trainer.analysis.results import image_table
from ti_trainer.analysis.run_files import IMAGE_REPORT_CSV, RunInfo
from ti_trainer.backends.contract import LatentDistribution
from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.training.data import TrainingImage

NAME = "testemb"


def planted_set(outlier_at: int, count: int = 6, seed: int = 0) -> list[TrainingImage]:
    """`count` images whose latents are close to one another, except one far from them all."""
    generator = torch.Generator().manual_seed(seed)
    common = 0.5 * torch.randn(1, 4, 8, 8, generator=generator)
    images = []
    for index in range(count):
        if index == outlier_at:
            latent = 3.0 * torch.randn(1, 4, 8, 8, generator=generator)
        else:
            latent = common + 0.05 * torch.randn(1, 4, 8, 8, generator=generator)
        distribution = LatentDistribution(latent, torch.zeros_like(latent))
        images.append(
            TrainingImage(
                f"a drawing, simple shapes {index}", f"/data/{index:02d}.png", distribution, latent, None
            )
        )
    return images


@pytest.fixture(scope="module")
def backend():
    model = tiny_backend("v")
    model.prompt_encoder.chunker.register(NAME, 2)
    return model


def probe_for(images, seed: int = 3):
    prompts = [f"{image.caption}, {NAME}" for image in images]
    return probe_batch(images, prompts, NAME, seed, 1000)


@pytest.mark.parametrize("outlier_at", [0, 4])
def test_a_planted_outlier_gets_the_largest_gradient_share(backend, outlier_at):
    images = planted_set(outlier_at)
    vectors = backend.token_vectors("painting").repeat(2, 1)
    rows = image_rows(backend, probe_for(images), images, vectors, max_batch=4, precision="fp32")

    shares = [row.gradient_share for row in rows]
    assert sum(shares) == pytest.approx(1.0)
    assert max(range(len(rows)), key=shares.__getitem__) == outlier_at
    assert dominant({row.image: row.gradient_share for row in rows}) == [rows[outlier_at].image]
    assert max(range(len(rows)), key=lambda i: rows[i].loss) == outlier_at
    assert [row.image for row in rows] == [f"{i:02d}.png" for i in range(6)]


def test_an_even_set_has_no_dominant_image(backend):
    images = planted_set(outlier_at=-1)
    rows = image_rows(
        backend, probe_for(images), images, backend.token_vectors("painting").repeat(2, 1), 4, "fp32"
    )
    assert dominant({row.image: row.gradient_share for row in rows}) == []


def test_each_sample_gets_its_own_gradient_whatever_the_batching(backend):
    images = planted_set(outlier_at=2, count=3)
    probe = probe_for(images)
    vectors = backend.token_vectors("painting").repeat(2, 1)
    losses_batched, batched = sample_gradients(backend, probe, vectors, max_batch=6, precision="fp32")
    losses_single, single = sample_gradients(backend, probe, vectors, max_batch=1, precision="fp32")
    assert torch.allclose(losses_batched, losses_single, rtol=1e-4)
    assert torch.allclose(batched, single, rtol=1e-3, atol=1e-9)
    assert batched.abs().sum() > 0, "a zero gradient would make every share meaningless"
    # The probe: every image at the same timesteps, with the same noise.
    assert [s.timestep for s in probe.samples[:2]] == [s.timestep for s in probe.samples[2:4]]
    assert torch.equal(probe.samples[0].noise, probe.samples[2].noise)


def test_the_report_is_kept_per_step_and_tabled_heaviest_first(backend, tmp_path):
    (tmp_path / "settings-2024-01-01-00-00-00.json").write_text(
        f'{{"ti_trainer_config": {{"embedding_name": "{NAME}"}}}}'
    )
    images = planted_set(outlier_at=1)
    vectors = backend.token_vectors("painting").repeat(2, 1)
    rows = image_rows(backend, probe_for(images), images, vectors, 4, "fp32")
    write_image_report(tmp_path / IMAGE_REPORT_CSV, 10, rows)
    write_image_report(tmp_path / IMAGE_REPORT_CSV, 0, rows)
    later = image_rows(backend, probe_for(images), images, 2 * vectors, 4, "fp32")
    write_image_report(tmp_path / IMAGE_REPORT_CSV, 10, later)  # measured again: replaces step 10 only

    run = RunInfo.open(tmp_path)
    assert run.image_report(0)[0] == 0 and len(run.image_report(0)[1]) == 6
    step, table = image_table(run)
    assert step == 10 and len(table) == 6
    assert [row[2] for row in table] != [round(row.loss, 5) for row in rows], "step 10 was replaced"
    assert table[0][0] == "01.png" and table[0][4] == "pulls much harder than most: check it"
    assert [row[3] for row in table] == sorted((row[3] for row in table), reverse=True)
