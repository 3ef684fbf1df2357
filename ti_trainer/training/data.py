"""Training data: images -> cached latents, and which images go into every micro-batch.

Semantics follow A1111 (reference/a1111.md §1.7): batch size is capped at the number of images, gradient
accumulation at images // batch; an epoch is images // batch micro-batches with a trailing partial
accumulation group dropped (the counting is batch_plan.plan's, the one rule the panels show too); images of
different sizes never share a batch. Latent sampling: "once" samples
the VAE distribution once up front, "deterministic" uses its mean, "random" samples anew every use.

Which images a micro-batch holds is a pure function of (seed, micro-batch index), so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ti_trainer.backends.contract import LatentDistribution
from ti_trainer.images import LoadedImage
from ti_trainer.training import batch_plan
from ti_trainer.training.buckets import aspect_buckets, cover_and_crop, training_size

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

ENCODE_BATCH = 4


@dataclass
class TrainingImage:
    caption: str
    source: str
    latent: LatentDistribution  # single image, [1, C, h, w]
    fixed_sample: torch.Tensor | None  # set for "once" and "deterministic"
    weight: torch.Tensor | None  # alpha loss weight [C, h, w] (mean 1), when enabled

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.latent.mean.shape[-2:])


@dataclass
class MicroBatch:
    indices: list[int]
    latents: torch.Tensor
    captions: list[str]
    weights: torch.Tensor | None


def to_pixels(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def alpha_weight(alpha: Image.Image, latent_hw: tuple[int, int], channels: int) -> torch.Tensor:
    """A1111's loss weight from PNG alpha: resized to latent size, shifted to min 0, scaled to mean 1."""
    resized = alpha.resize((latent_hw[1], latent_hw[0]), Image.BICUBIC)
    weight = torch.from_numpy(np.asarray(resized, dtype=np.float32)).expand(channels, *latent_hw).clone()
    weight -= weight.min()
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones_like(weight)


class TrainingData:
    def __init__(self, images: list[TrainingImage], batch_size: int, gradient_accumulation: int, seed: int):
        self.images = images
        planned = batch_plan.plan(len(images), batch_size, gradient_accumulation)
        self.plan = planned  # what the run was asked for, capped to the dataset: the one counting rule
        self.batch_size = planned.batch_size
        self.gradient_accumulation = planned.gradient_accumulation
        self.steps_per_epoch = planned.steps_per_epoch
        self.micro_batches_per_epoch = self.steps_per_epoch * self.gradient_accumulation
        self.seed = seed
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def epoch_of(self, micro_index: int) -> int:
        return micro_index // self.micro_batches_per_epoch

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The micro-batches of one epoch: full batches per size bucket, topped up from buckets with leftovers."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(f"epoch:{self.seed}:{epoch}")
        by_size: dict[tuple, list[int]] = defaultdict(list)
        for index, image in enumerate(self.images):
            by_size[image.size].append(index)
        plan: list[list[int]] = []
        leftovers: dict[tuple, list[int]] = {}
        for size in sorted(by_size):
            members = by_size[size][:]
            rng.shuffle(members)
            full = len(members) // self.batch_size * self.batch_size
            plan += [members[i : i + self.batch_size] for i in range(0, full, self.batch_size)]
            if len(members) > full:
                leftovers[size] = members
        wanted = len(self.images) // self.batch_size
        while len(plan) < wanted and leftovers:
            # Extra batches drawn from buckets in proportion to what they had left over, with replacement.
            sizes = sorted(leftovers)
            size = rng.choices(sizes, weights=[len(leftovers[s]) % self.batch_size for s in sizes])[0]
            plan.append(rng.choices(leftovers[size], k=self.batch_size))
        rng.shuffle(plan)
        plan = plan[: self.micro_batches_per_epoch]
        self._epoch_cache = (epoch, plan)
        return plan

    def micro_batch(self, micro_index: int, generator: torch.Generator) -> MicroBatch:
        plan = self.epoch_plan(self.epoch_of(micro_index))
        indices = plan[micro_index % self.micro_batches_per_epoch]
        chosen = [self.images[i] for i in indices]
        latents = torch.cat(
            [
                img.fixed_sample if img.fixed_sample is not None else img.latent.sample(generator)
                for img in chosen
            ]
        )
        weights = None
        if chosen[0].weight is not None:
            weights = torch.stack([img.weight for img in chosen])
        return MicroBatch(indices, latents, [img.caption for img in chosen], weights)


def prepare_images(
    loaded: list[LoadedImage],
    width: int,
    height: int,
    keep_size: bool,
    use_buckets: bool,
    bucket_max_ratio: float = 2.0,
) -> list[tuple[LoadedImage, Image.Image]]:
    """Each image at its training size (the source file is never touched: this works on a copy).
    `bucket_max_ratio`: the model family's widest bucket (`ModelFamily.bucket_max_ratio`)."""
    buckets = aspect_buckets(width, height, bucket_max_ratio) if use_buckets else None
    prepared = []
    for item in loaded:
        size = training_size(item.image, width, height, keep_size, buckets)
        image = item.image if item.image.size == size else cover_and_crop(item.image, size)
        prepared.append((item, image))
    return prepared


def encode_dataset(
    backend: Backend,
    prepared: list[tuple[LoadedImage, Image.Image]],
    latent_sampling: str,
    use_alpha: bool,
    seed: int,
) -> list[TrainingImage]:
    """VAE-encode every image once (batched by size); the VAE is not needed again while training."""
    generator = torch.Generator().manual_seed(seed)
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for index, (_, image) in enumerate(prepared):
        by_size[image.size].append(index)
    distributions: dict[int, LatentDistribution] = {}
    for indices in by_size.values():
        for start in range(0, len(indices), ENCODE_BATCH):
            chunk = indices[start : start + ENCODE_BATCH]
            pixels = torch.stack([to_pixels(prepared[i][1]) for i in chunk])
            dist = backend.encode_images(pixels)
            for row, index in enumerate(chunk):
                distributions[index] = LatentDistribution(dist.mean[row : row + 1], dist.std[row : row + 1])
    images = []
    for index, (item, image) in enumerate(prepared):
        dist = distributions[index]
        if latent_sampling == "once":
            fixed = dist.sample(generator)
        elif latent_sampling == "deterministic":
            fixed = dist.mean.clone()
        else:
            fixed = None
        weight = None
        if use_alpha:
            channels, *latent_hw = dist.mean.shape[1:]
            alpha = image.getchannel("A") if "A" in image.getbands() else None
            weight = (
                alpha_weight(alpha, tuple(latent_hw), channels) if alpha else torch.ones(dist.mean.shape[1:])
            )
        images.append(TrainingImage(item.caption, str(item.path), dist, fixed, weight))
    return images
