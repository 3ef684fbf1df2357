"""Fixed batches: the training objective on images, prompts, noise and timesteps drawn once from the seed.

The training loss is too noisy to read, because every step draws a different batch, noise and timestep
(reference/peers.md §4, DVAR). Fixing all of them turns the same objective into a curve that only moves when
the embedding does. Two batches are built here:

- the validation batch: a few samples (DVAR uses 4), evaluated every N steps under no_grad;
- the image probe: every image at the same few timesteps with the same noise, so images can be compared with
  each other (which image the embedding fits worst, which one pulls hardest on it).

Everything is drawn from generators seeded by (seed, purpose), never from the global generator or the
training's own streams, so evaluating changes nothing about the run and two runs with one seed agree.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.vectors import Vectors, flat_values, map_vectors, vector_tensors
from ti_trainer.text.prompts import build_prompt
from ti_trainer.text.templates import NAME_PLACEHOLDER, read_template
from ti_trainer.training.data import TrainingImage
from ti_trainer.training.setup import find_template
from ti_trainer.training.step import step_loss

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

# The validation batch is about one training step's worth of images: at least DVAR's 4, at most 8. Its cost
# is then one forward pass per image of a step every N steps, i.e. under 15% at batch 1 with N = 10 and a
# few percent at the batch sizes the seeds use.
MIN_VALIDATION_SAMPLES, MAX_VALIDATION_SAMPLES = 4, 8
PROBE_TIMESTEPS = 2  # per image: one in each half of the schedule (the detail and the composition ends)
FP16_LOSS_SCALE = 1024.0  # keeps fp16 gradients of one image's loss from underflowing


@dataclass
class FixedSample:
    image_index: int
    latent: torch.Tensor  # [1, C, h, w]
    noise: torch.Tensor  # [1, C, h, w]
    timestep: int
    prompt: str
    weight: torch.Tensor | None  # [C, h, w] (PNG alpha), when the run weights its loss


@dataclass
class FixedBatch:
    name: str  # the embedding's name, as it appears in the prompts
    samples: list[FixedSample]

    def groups(self, max_batch: int) -> list[list[int]]:
        """Sample indices in batches of at most `max_batch`, never mixing latent sizes."""
        by_size: dict[tuple, list[int]] = defaultdict(list)
        for index, sample in enumerate(self.samples):
            by_size[tuple(sample.latent.shape)].append(index)
        step = max(1, max_batch)
        return [
            members[start : start + step]
            for members in by_size.values()
            for start in range(0, len(members), step)
        ]


def _generator(seed: int, purpose: str) -> torch.Generator:
    # A stable mix of the seed and a purpose label, independent of the loop's per-micro-batch generators.
    mixed = random.Random(f"{purpose}:{seed}").getrandbits(63)
    return torch.Generator().manual_seed(mixed)


def fixed_prompts(config: TrainConfig, name: str, captions: list[str], seed: int) -> list[str]:
    """One prompt per caption, from the run's template, with no tag shuffle or dropout: a fixed caption."""
    template = read_template(find_template(config))
    lines = [line for line in template.lines if NAME_PLACEHOLDER in line] or template.lines
    prompts = []
    for index, caption in enumerate(captions):
        rng = random.Random(f"validation-prompt:{seed}:{index}")
        prompts.append(build_prompt(rng.choice(lines), name, caption, rng))
    return prompts


def _fixed_latent(image: TrainingImage) -> torch.Tensor:
    # The distribution's mean: the same whatever latent sampling the run uses ("random" has no fixed sample).
    return image.latent.mean.float().cpu()


def stratified_timesteps(count: int, num_timesteps: int, generator: torch.Generator) -> list[int]:
    """`count` timesteps, one in each of `count` equal ranges of the schedule, at a random place within it."""
    jitter = torch.rand(count, generator=generator, dtype=torch.float64)
    return [min(num_timesteps - 1, int((k + float(jitter[k])) * num_timesteps / count)) for k in range(count)]


def validation_sample_count(images_per_step: int) -> int:
    return max(MIN_VALIDATION_SAMPLES, min(MAX_VALIDATION_SAMPLES, images_per_step))


def validation_batch(
    images: list[TrainingImage],
    prompts: list[str],
    name: str,
    seed: int,
    num_timesteps: int,
    count: int = MIN_VALIDATION_SAMPLES,
) -> FixedBatch:
    """`count` samples: distinct images where there are enough (a seeded choice), repeated at other
    timesteps where there are fewer; each sample in its own range of timesteps."""
    generator = _generator(seed, "validation")
    order = torch.randperm(len(images), generator=generator).tolist()
    chosen = [order[k % len(order)] for k in range(count)]
    timesteps = stratified_timesteps(count, num_timesteps, generator)
    # Shuffle which sample gets which range, so repeated images don't always get neighbouring ones.
    timesteps = [timesteps[k] for k in torch.randperm(count, generator=generator).tolist()]
    samples = []
    for index, timestep in zip(chosen, timesteps):
        latent = _fixed_latent(images[index])
        noise = torch.randn(latent.shape, generator=generator)
        samples.append(FixedSample(index, latent, noise, timestep, prompts[index], images[index].weight))
    return FixedBatch(name, samples)


def probe_batch(
    images: list[TrainingImage], prompts: list[str], name: str, seed: int, num_timesteps: int
) -> FixedBatch:
    """Every image at the same `PROBE_TIMESTEPS` timesteps, with the same noise for images of one size."""
    generator = _generator(seed, "image-probe")
    timesteps = stratified_timesteps(PROBE_TIMESTEPS, num_timesteps, generator)
    noise_by_size: dict[tuple, list[torch.Tensor]] = {}
    samples = []
    for index, image in enumerate(images):
        latent = _fixed_latent(image)
        shape = tuple(latent.shape)
        if shape not in noise_by_size:
            sized = _generator(seed, f"image-probe-noise:{shape}")
            noise_by_size[shape] = [torch.randn(shape, generator=sized) for _ in timesteps]
        for timestep, noise in zip(timesteps, noise_by_size[shape]):
            samples.append(FixedSample(index, latent, noise, timestep, prompts[index], image.weight))
    return FixedBatch(name, samples)


def _group_inputs(batch: FixedBatch, members: list[int]):
    """The samples `members` as one micro-batch: prompts, latents, noise, timesteps and loss weights."""
    chosen = [batch.samples[i] for i in members]
    latents = torch.cat([s.latent for s in chosen])
    noise = torch.cat([s.noise for s in chosen])
    timesteps = torch.tensor([s.timestep for s in chosen], dtype=torch.long)
    weights = torch.stack([s.weight for s in chosen]) if chosen[0].weight is not None else None
    return [s.prompt for s in chosen], latents, noise, timesteps, weights


@torch.no_grad()
def sample_losses(
    backend: Backend, batch: FixedBatch, vectors: Vectors, max_batch: int, precision: str
) -> torch.Tensor:
    """The loss of every sample (float64, CPU), evaluated in batches no larger than the training batch, by
    the training step itself in the run's `precision` (the memory plan's)."""
    losses = torch.zeros(len(batch.samples), dtype=torch.float64)
    injected = {batch.name: map_vectors(vectors, torch.Tensor.detach)}
    for members in batch.groups(max_batch):
        prompts, latents, noise, timesteps, weights = _group_inputs(batch, members)
        per_sample = step_loss(
            backend, prompts, latents, noise, timesteps, weights, injected, precision, per_sample=True
        )
        losses[members] = per_sample.double().cpu()
    return losses


def sample_gradients(
    backend: Backend, batch: FixedBatch, vectors: Vectors, max_batch: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's loss and the gradient of that loss alone with respect to the vectors, in the run's
    `precision` (the memory plan's): `[samples]` and `[samples, values]`, each gradient flattened over every
    tensor of the vectors (both encoders' for SDXL, in `vector_tensors` order).

    Each sample's prompt is encoded with its own copy of the vectors, so one backward pass through a batch
    leaves each copy holding its own sample's gradient.
    """
    scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
    count = len(batch.samples)
    losses = torch.zeros(count, dtype=torch.float64)
    gradients = torch.zeros(count, flat_values(vectors).numel(), dtype=torch.float64)
    base = map_vectors(vectors, torch.Tensor.detach)
    for group in batch.groups(max_batch):
        # A prompt past 75 tokens has a longer conditioning; such samples go through one at a time.
        by_length: dict[int, list[int]] = defaultdict(list)
        for index in group:
            by_length[backend.prompt_encoder.chunk_count(batch.samples[index].prompt)].append(index)
        for members in by_length.values():
            prompts, latents, noise, timesteps, weights = _group_inputs(batch, members)
            copies = [map_vectors(base, lambda t: t.clone().requires_grad_(True)) for _ in members]
            per_copy = [{batch.name: copy} for copy in copies]
            per_sample = step_loss(
                backend, prompts, latents, noise, timesteps, weights, per_copy, precision, per_sample=True
            )
            (per_sample.sum() * scale).backward()
            for index, copy, loss in zip(members, copies, per_sample.detach().double().cpu()):
                losses[index] = loss
                grads = [tensor.grad.reshape(-1) for tensor in vector_tensors(copy)]
                gradients[index] = torch.cat(grads).double().cpu() / scale
    return losses, gradients
