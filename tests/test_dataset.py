"""Batches, epochs, latent sampling and sizes, with A1111's meanings (reference/a1111.md §1.7)."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from ti_trainer.backends.contract import LatentDistribution
from ti_trainer.images import LoadedImage
from ti_trainer.training.buckets import aspect_buckets, cover_and_crop, nearest_bucket
from ti_trainer.training.data import TrainingData, TrainingImage, alpha_weight, encode_dataset, prepare_images


def fake_image(size=(8, 8), index=0) -> TrainingImage:
    mean = torch.full((1, 4, *size), float(index))
    return TrainingImage(
        f"caption {index}", f"img{index}.png", LatentDistribution(mean, torch.ones_like(mean)), mean, None
    )


@pytest.mark.parametrize(
    ("images", "batch", "accumulation", "expected_batch", "expected_accumulation", "steps_per_epoch"),
    [
        (17, 1, 17, 1, 17, 1),  # the seed's prime-sized set: batch 1 x accumulation 17
        (33, 3, 11, 3, 11, 1),
        (30, 2, 15, 2, 15, 1),
        (10, 4, 1, 4, 1, 2),  # 10 // 4 = 2 micro-batches per epoch, the remainder changes every epoch
        (5, 8, 1, 5, 1, 1),  # batch capped at the number of images
        (6, 2, 10, 2, 3, 1),  # accumulation capped at images // batch
        (7, 2, 2, 2, 2, 1),  # 3 micro-batches, a trailing partial accumulation group is dropped
    ],
)
def test_epoch_arithmetic_matches_a1111(
    images, batch, accumulation, expected_batch, expected_accumulation, steps_per_epoch
):
    data = TrainingData([fake_image(index=i) for i in range(images)], batch, accumulation, seed=0)
    assert (data.batch_size, data.gradient_accumulation) == (expected_batch, expected_accumulation)
    assert data.steps_per_epoch == steps_per_epoch
    assert data.micro_batches_per_epoch == steps_per_epoch * expected_accumulation


def test_an_epoch_shows_each_image_at_most_once_and_order_changes():
    data = TrainingData([fake_image(index=i) for i in range(12)], 3, 1, seed=5)
    first, second = data.epoch_plan(0), data.epoch_plan(1)
    assert sorted(i for batch in first for i in batch) == list(range(12))
    assert first != second
    assert first == TrainingData([fake_image(index=i) for i in range(12)], 3, 1, seed=5).epoch_plan(0)


def test_images_of_different_sizes_never_share_a_batch():
    images = [fake_image((8, 8), i) for i in range(5)] + [fake_image((8, 12), i) for i in range(5, 9)]
    data = TrainingData(images, 2, 1, seed=1)
    for epoch in range(5):
        plan = data.epoch_plan(epoch)
        assert len(plan) == 9 // 2
        for batch in plan:
            assert len({images[i].size for i in batch}) == 1
            batch_tensor = data.micro_batch(epoch * data.micro_batches_per_epoch, torch.Generator()).latents
            assert batch_tensor.shape[0] == 2


def test_latent_sampling_modes(backend):
    loaded = [LoadedImage(f"{i}.png", Image.new("RGB", (64, 64), (40 * i, 90, 160)), "c") for i in range(2)]
    prepared = prepare_images(loaded, 64, 64, keep_size=False, use_buckets=False)
    once = encode_dataset(backend, prepared, "once", use_alpha=False, seed=3)
    deterministic = encode_dataset(backend, prepared, "deterministic", use_alpha=False, seed=3)
    random_ = encode_dataset(backend, prepared, "random", use_alpha=False, seed=3)

    assert torch.equal(deterministic[0].fixed_sample, deterministic[0].latent.mean)
    assert not torch.equal(once[0].fixed_sample, once[0].latent.mean), "once samples the distribution"
    assert torch.equal(
        once[0].fixed_sample, encode_dataset(backend, prepared, "once", False, seed=3)[0].fixed_sample
    )
    data = TrainingData(random_, 1, 1, seed=0)
    a = data.micro_batch(0, torch.Generator().manual_seed(1)).latents
    b = data.micro_batch(2, torch.Generator().manual_seed(2)).latents  # same image, next epoch
    assert random_[0].fixed_sample is None and a.shape == b.shape and not torch.equal(a, b)
    once_data = TrainingData(once, 1, 1, seed=0)
    assert torch.equal(
        once_data.micro_batch(0, torch.Generator()).latents,
        once_data.micro_batch(2, torch.Generator()).latents,
    )


def test_images_are_cropped_not_stretched():
    # A wide image with a red left third: after cover-and-crop to a square the centre (blue) remains.
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    square = cover_and_crop(image, (64, 64))
    assert square.size == (64, 64)
    assert square.getpixel((32, 32)) == (0, 0, 255) and square.getpixel((0, 32))[2] > 200


def test_aspect_buckets_keep_the_area_and_pick_the_nearest_ratio():
    buckets = aspect_buckets(512, 512)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert all(max(w, h) / min(w, h) <= 2 for w, h in buckets)
    wide = nearest_bucket((1600, 900), buckets)
    tall = nearest_bucket((900, 1600), buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])
    loaded = [
        LoadedImage("w.png", Image.new("RGB", (1600, 900)), ""),
        LoadedImage("s.png", Image.new("RGB", (700, 700)), ""),
    ]
    sizes = [image.size for _, image in prepare_images(loaded, 512, 512, keep_size=False, use_buckets=True)]
    assert sizes == [wide, (512, 512)]


def test_keep_size_trims_to_multiples_of_8():
    loaded = [LoadedImage("odd.png", Image.new("RGB", (101, 77)), "")]
    assert prepare_images(loaded, 512, 512, keep_size=True, use_buckets=False)[0][1].size == (96, 72)


def test_alpha_weight_has_mean_one_and_follows_the_mask():
    alpha = Image.new("L", (64, 64), 0)
    alpha.paste(255, (0, 0, 32, 64))
    weight = alpha_weight(alpha, (8, 8), 4)
    assert weight.shape == (4, 8, 8)
    assert weight.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert weight[:, :, 0].min() > weight[:, :, -1].max()


def test_micro_batches_are_a_pure_function_of_seed_and_index():
    images = [fake_image(index=i) for i in range(9)]
    a, b = TrainingData(images, 2, 2, seed=11), TrainingData(images, 2, 2, seed=11)
    order = list(range(20))
    random.Random(0).shuffle(order)  # visit in another order: nothing may depend on history
    for index in order:
        assert (
            a.micro_batch(index, torch.Generator()).indices == b.micro_batch(index, torch.Generator()).indices
        )
    assert [a.micro_batch(i, torch.Generator()).indices for i in range(4)] != [
        TrainingData(images, 2, 2, seed=12).micro_batch(i, torch.Generator()).indices for i in range(4)
    ]
