"""Which image dominates: each image's loss and its share of the gradient.

An image the embedding fits worst keeps a high loss; an image that "asserts itself over the others" (the seeds'
tree branches that appeared everywhere) pulls hardest on the vectors. The share is the length of that image's
gradient over the sum of all images' lengths, so shares add up to 100% and an even set gives each about 1/N.

Two ways to measure it, one meaning:

- from the training passes (`PassTally`), while a run trains at batch size 1 (the default): each micro-batch
  then holds one image, so its loss and its gradient are that image's alone, computed anyway. The report is
  free: each image's loss and gradient length are averaged over its latest `REPORT_PASSES` passes (random
  timesteps and noise, averaged out over the passes). The first report comes once every image has had that
  many passes (step ~6 x images at batch 1), the last at the end of the run.
- on the probe batch (`image_rows`): every image at the same fixed timesteps and noise, with the gradient of
  each sample alone. It costs a forward and backward pass per image and timestep (about 2.6 training steps per
  image), so a run pays it only at a batch size above 1, whose micro-batches mix images, at the start and the
  end; the results panel and `report_for_step` measure any saved step this way on demand.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ti_trainer.analysis.fixed_batch import (
    PROBE_TIMESTEPS,
    FixedBatch,
    fixed_prompts,
    probe_batch,
    sample_gradients,
)
from ti_trainer.analysis.run_files import (
    IMAGE_REPORT_COLUMNS,
    IMAGE_REPORT_CSV,
    RunInfo,
    number,
    read_rows,
    write_rows,
)
from ti_trainer.embeddings.checks import require_fits
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.embeddings.vectors import Vectors, map_vectors
from ti_trainer.errors import UserError
from ti_trainer.images import load_folder
from ti_trainer.memory.plan import plan_for
from ti_trainer.training import batch_plan
from ti_trainer.training.data import TrainingImage, encode_dataset, prepare_images

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

# An image pulling 1.5 times as hard as the typical (median) image is worth a look. The median, not the even
# share 1/N, because a dominant image lowers everyone else's share. It is a hint to look, not a verdict.
DOMINANT_FACTOR = 1.5
# Passes per image in a report from the training passes: enough that one odd timestep does not decide an
# image's share, few enough that the first report comes early (step ~6 x images at batch 1).
REPORT_PASSES = 6


@dataclass
class ImageRow:
    image: str
    caption: str
    loss: float
    gradient_share: float


def image_rows(
    backend: Backend,
    probe: FixedBatch,
    images: list[TrainingImage],
    vectors: Vectors,
    max_batch: int,
    precision: str,
) -> list[ImageRow]:
    """Each image's loss and gradient share, computed in the run's `precision` (its memory plan's)."""
    losses, gradients = sample_gradients(backend, probe, vectors, max_batch, precision)
    per_image_loss = torch.zeros(len(images), dtype=torch.float64)
    per_image_gradient = torch.zeros(len(images), gradients.shape[1], dtype=torch.float64)
    for index, sample in enumerate(probe.samples):
        per_image_loss[sample.image_index] += losses[index] / PROBE_TIMESTEPS
        per_image_gradient[sample.image_index] += gradients[index] / PROBE_TIMESTEPS
    lengths = per_image_gradient.flatten(1).norm(dim=1)
    total = float(lengths.sum()) or 1.0
    return [
        ImageRow(Path(image.source).name, image.caption, float(per_image_loss[i]), float(lengths[i]) / total)
        for i, image in enumerate(images)
    ]


class PassTally:
    """Each image's latest `REPORT_PASSES` training passes (loss and gradient length), kept on the device as
    they come and read once, when a report is written."""

    def __init__(self, images: list[TrainingImage]):
        self.images = images
        self.passes: list[deque] = [deque(maxlen=REPORT_PASSES) for _ in images]

    def add(self, image_index: int, loss: torch.Tensor, gradient: torch.Tensor) -> None:
        self.passes[image_index].append(
            torch.stack([loss.detach().float(), gradient.detach().float().norm()])
        )

    def has_passes(self, count: int) -> bool:
        """Every image has had at least `count` passes (of the latest `REPORT_PASSES`)."""
        return all(len(kept) >= min(count, REPORT_PASSES) for kept in self.passes)

    def rows(self) -> list[ImageRow]:
        """Each image's mean loss and mean gradient length over its kept passes, the lengths as shares. A pass
        whose loss or gradient was not finite (a step the run skipped) is left out."""
        losses, lengths = [], []
        for kept in self.passes:
            values = torch.stack(list(kept)).double().cpu()
            values = values[torch.isfinite(values).all(dim=1)]
            mean = values.mean(dim=0) if len(values) else torch.full((2,), float("nan"), dtype=torch.float64)
            losses.append(float(mean[0]))
            lengths.append(float(mean[1]))
        total = sum(length for length in lengths if length == length) or 1.0
        return [
            ImageRow(Path(image.source).name, image.caption, loss, length / total)
            for image, loss, length in zip(self.images, losses, lengths)
        ]


def dominant(shares: dict[str, float]) -> list[str]:
    """Images whose gradient share is at least DOMINANT_FACTOR times the median image's."""
    if len(shares) < 3:
        return []  # with one or two images there is no "typical" image to stand out from
    typical = statistics.median(shares.values())
    return [name for name, share in shares.items() if share >= DOMINANT_FACTOR * typical]


def write_image_report(path: Path, step: int, rows: list[ImageRow]) -> Path:
    """Replace the rows of `step` in the report, keeping other steps' rows."""
    kept = [row for row in read_rows(path) if row.get("step") != str(step)]
    new = [
        {
            "step": step,
            "image": row.image,
            "caption": row.caption,
            "loss": number(row.loss),
            "gradient_share": number(row.gradient_share),
        }
        for row in rows
    ]
    ordered = sorted(kept + new, key=lambda row: int(row["step"]))
    return write_rows(path, list(IMAGE_REPORT_COLUMNS), ordered)


def report_for_step(run: RunInfo, backend: Backend, step: int) -> list[ImageRow]:
    """Measure the report at any saved step of a finished run, with the model it was trained on.

    The images are read and encoded again from the run's dataset folder; the probe is drawn from the run's
    seed as during training, so the numbers line up with the ones measured then.
    """
    saved = run.saved_steps()
    if step not in saved:
        raise UserError(f"Step {step} has no saved copy in {run.embeddings_folder}.")
    config = run.config
    if config.seed is None:
        raise UserError(f"The settings of {run.root} do not record the run's seed; the report needs it.")
    # A borrowed model (the WebUI's) is frozen for the backward pass and given back as it was found.
    with backend.training_session():
        rows = _measure(run, backend, config, saved[step])
    write_image_report(run.root / IMAGE_REPORT_CSV, step, rows)
    return rows


def _measure(run: RunInfo, backend: Backend, config, embedding_path: Path) -> list[ImageRow]:
    embedding = load_embedding(embedding_path)
    require_fits(embedding_path, embedding.vectors, backend.family)
    vectors = map_vectors(embedding.vectors, lambda tensor: tensor.to(backend.device))
    folder = load_folder(
        config.data_dir, config.use_alpha_weight, config.filename_regex, config.filename_join
    )
    prepared = prepare_images(
        folder.images,
        config.width,
        config.height,
        config.keep_size,
        config.aspect_buckets,
        backend.family.bucket_max_ratio,
    )
    images = encode_dataset(backend, prepared, "deterministic", config.use_alpha_weight, config.seed)
    backend.prompt_encoder.chunker.register(run.name, embedding.num_vectors)
    prompts = fixed_prompts(config, run.name, [image.caption for image in images], config.seed)
    probe = probe_batch(images, prompts, run.name, config.seed, backend.schedule.num_timesteps)
    # The run's batch as trained, and the precision its memory plan chose on this model (the WebUI's fp16
    # weights are computed in fp16, as in training, not in the device's own "auto" choice).
    batch = batch_plan.plan(len(images), config.batch_size, config.gradient_accumulation).batch_size
    return image_rows(backend, probe, images, vectors, batch, plan_for(config, backend).precision)
