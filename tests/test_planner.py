"""The planner's arithmetic: the same counts training uses, and the seeds' hand arithmetic done for them."""

from __future__ import annotations

import pytest

from ti_trainer.training import batch_plan
from ti_trainer.training.data import TrainingData


@pytest.mark.parametrize("images", [1, 2, 5, 17, 25, 33])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8, 40])
@pytest.mark.parametrize("accumulation", [1, 2, 3, 11, 50])
def test_plan_counts_what_training_counts(images, batch, accumulation):
    data = TrainingData([object()] * images, batch, accumulation, seed=0)
    p = batch_plan.plan(images, batch, accumulation)
    assert (p.batch_size, p.gradient_accumulation, p.steps_per_epoch) == (
        data.batch_size,
        data.gradient_accumulation,
        data.steps_per_epoch,
    )
    assert p.images_per_epoch == data.micro_batches_per_epoch * data.batch_size
    assert p.images_per_epoch + p.sitting_out == images


def test_the_seed_dataset_33_images_batch_3():
    # seeds/000: "I have 33 images. Batched for 3 images at a time, with gradient of 11".
    p = batch_plan.plan(33, 3, 11)
    assert (p.images_per_step, p.steps_per_epoch, p.divides_evenly) == (33, 1, True)

    combos = batch_plan.even_combinations(33, max_batch=3)
    assert combos[0] == batch_plan.Combination(3, 11, 1)
    assert all(33 % c.images_per_step == 0 for c in combos)
    assert {c.batch_size for c in combos} == {3, 1}  # 2 does not divide 33
    assert batch_plan.Combination(3, 1, 11) in combos


def test_a_prime_dataset_gets_batch_one_and_culling_advice():
    # seeds/000: "a prime number like 17? I should do batch size of 1 and gradient accumulation 17".
    combos = batch_plan.even_combinations(17, max_batch=3)
    assert [(c.batch_size, c.gradient_accumulation) for c in combos] == [(1, 17), (1, 1)]
    assert batch_plan.nearby_dataset_sizes(17, 3) == (15, 18)
    assert batch_plan.nearby_dataset_sizes(33, 2) == (32, 34)
    assert batch_plan.nearby_dataset_sizes(4, 2) == (None, 6)  # already even: only "add"


def test_uneven_choice_says_how_many_images_sit_out():
    p = batch_plan.plan(33, 2, 4)
    assert (p.images_per_step, p.steps_per_epoch, p.sitting_out) == (8, 4, 1)
    text = "\n".join(batch_plan.explain(p, max_steps=100, save_every=50, preview_every=0))
    assert "1 of 33 images sit out" in text
    assert "32 or 40 images" in text
    assert "every 48 steps (every 12 epochs)" in text
    assert "Max steps 100 = 25 epochs" in text


def test_capped_batch_is_explained():
    p = batch_plan.plan(3, 8, 2)
    assert (p.batch_size, p.gradient_accumulation) == (3, 1)
    assert any("training uses 3" in note for note in p.notes)
    assert any("training uses 1" in note for note in p.notes)


def test_epoch_aligned_save_intervals():
    assert batch_plan.epoch_aligned_intervals(33, 660) == [33, 66, 99, 132]  # 5..20 copies
    assert batch_plan.epoch_aligned_intervals(1, 100) == [2, 3, 4, 5, 10, 20]
    assert batch_plan.epoch_aligned_intervals(500, 100) == []  # the run is shorter than an epoch
    assert batch_plan.nearest_aligned(50, 33) == 66
    assert batch_plan.nearest_aligned(10, 33) == 33  # at least one epoch
    assert (
        batch_plan.is_aligned(66, 33)
        and not batch_plan.is_aligned(50, 33)
        and not batch_plan.is_aligned(0, 33)
    )
    text = "\n".join(batch_plan.explain(batch_plan.plan(33, 3, 1), 660, 11, 22))  # 11 steps per epoch
    assert "copies every 11 steps = every epoch" in text
    assert "previews every 22 steps = every 2 epochs" in text


def test_count_images_reads_only_image_files_at_the_top(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "a.txt").write_text("caption")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.png").write_bytes(b"")
    assert batch_plan.count_images(tmp_path) == 2
    assert batch_plan.count_images(tmp_path / "missing") is None
    assert batch_plan.count_images("") is None
