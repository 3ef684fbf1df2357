"""Batch x accumulation against the dataset: the arithmetic the seeds' authors do by hand.

"Batch size x gradient accumulation = number of images" (seeds/000) is the artists' rule of thumb: one
optimizer step then learns from every image, and copies saved every N steps land on whole epochs. This module
says what a choice means for a dataset (images per step, steps per epoch, images that sit out), suggests
choices that divide the dataset evenly, and save intervals that line up with epochs.

`plan` is the one capping rule (after A1111 §1.7): the batch is capped at the number of images, accumulation
at images // batch, and an epoch is images // batch micro-batches with a trailing partial accumulation group
dropped. Training (training/data.py `TrainingData`), the per-image report and the dataset report read their
numbers from it. No torch here: the panels call this on every keystroke.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.fsutil import scan_folder
from ti_trainer.images import is_image_file

# Save intervals: whole epochs, at multiples an artist would pick.
EPOCH_MULTIPLES = (1, 2, 3, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)
WANTED_SAVES = (5, 50)  # a useful number of copies to compare over a run


@dataclass(frozen=True)
class Plan:
    images: int
    batch_size: int  # as trained: capped at the number of images
    gradient_accumulation: int  # as trained: capped at images // batch
    steps_per_epoch: int
    notes: tuple[str, ...] = ()

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation

    @property
    def images_per_epoch(self) -> int:
        return self.steps_per_epoch * self.images_per_step

    @property
    def sitting_out(self) -> int:
        """Images left out of each epoch (a different few each time, since every epoch is reshuffled)."""
        return self.images - self.images_per_epoch

    @property
    def divides_evenly(self) -> bool:
        return self.sitting_out == 0


@dataclass(frozen=True)
class Combination:
    batch_size: int
    gradient_accumulation: int
    steps_per_epoch: int

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation


def count_images(folder: str | Path) -> int | None:
    """Image files directly inside `folder` (what training reads), or None when it is not a folder."""
    if not folder:
        return None
    path = Path(folder).expanduser()
    try:
        scan = scan_folder(path, "dataset folder")  # the loader's own listing, so the count is what it loads
    except UserError:
        return None
    return sum(1 for entry in scan.files if is_image_file(entry))


def plan(images: int, batch_size: int, gradient_accumulation: int) -> Plan:
    """What training will do with `images` images at this batch size and accumulation."""
    if images < 1:
        raise ValueError("a plan needs at least one image")
    asked_batch, asked_accumulation = max(1, int(batch_size)), max(1, int(gradient_accumulation))
    batch = min(asked_batch, images)
    accumulation = max(1, min(asked_accumulation, images // batch))
    batches = images // batch
    steps_per_epoch = (batches - batches % accumulation) // accumulation
    notes = []
    if batch < asked_batch:
        notes.append(f"Batch size {asked_batch} is more than the {images} images: training uses {batch}.")
    if accumulation < asked_accumulation:
        notes.append(
            f"Accumulation {asked_accumulation} needs more images than the dataset has: training uses "
            f"{accumulation}."
        )
    return Plan(images, batch, accumulation, steps_per_epoch, tuple(notes))


def divisors(number: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return sorted(set(small + [number // d for d in small]))


def even_combinations(images: int, max_batch: int, per_batch: int | None = 3) -> list[Combination]:
    """Batch x accumulation choices that use every image exactly once per epoch, largest batch first.

    For each batch size up to `max_batch` that divides the dataset: one step per epoch (the seeds' choice:
    the whole dataset in every step), one image batch per step, and the accumulation in between closest to
    the geometric middle; at most `per_batch` of them. `per_batch` None: every accumulation that divides.
    """
    found = []
    for batch in range(min(max_batch, images), 0, -1):
        if images % batch:
            continue
        options = divisors(images // batch)
        picked = set(options) if per_batch is None else _spread(options)
        for accumulation in sorted(picked, reverse=True)[:per_batch]:
            steps = plan(images, batch, accumulation).steps_per_epoch
            found.append(Combination(batch, accumulation, steps))
    return found


def _spread(options: list[int]) -> set[int]:
    """The smallest, the largest, and the one nearest their geometric middle."""
    picked = {options[-1], options[0]}
    middle = [a for a in options if a not in picked]
    if middle:
        centre = math.sqrt(options[-1])
        picked.add(min(middle, key=lambda a: abs(math.log(a / centre))))
    return picked


def nearby_dataset_sizes(images: int, batch_size: int) -> tuple[int | None, int]:
    """The nearest image counts below and above `images` that `batch_size` divides (for culling or adding)."""
    batch = max(1, batch_size)
    below = images - images % batch
    above = below + batch if images % batch else images + batch
    return (below if below >= batch and below != images else None), above


def epoch_aligned_intervals(steps_per_epoch: int, max_steps: int) -> list[int]:
    """Save intervals in whole epochs that give a useful number of copies over `max_steps`."""
    if steps_per_epoch < 1 or max_steps < 1:
        return []
    candidates = [steps_per_epoch * k for k in EPOCH_MULTIPLES if steps_per_epoch * k <= max_steps]
    fewest, most = WANTED_SAVES
    useful = [n for n in candidates if fewest <= max_steps // n <= most]
    return useful or candidates[:1]


def nearest_aligned(every_n_steps: int, steps_per_epoch: int) -> int:
    """The multiple of an epoch nearest to `every_n_steps` (at least one epoch)."""
    if steps_per_epoch < 1:
        return every_n_steps
    return max(1, round(every_n_steps / steps_per_epoch)) * steps_per_epoch


def is_aligned(every_n_steps: int, steps_per_epoch: int) -> bool:
    return every_n_steps > 0 and steps_per_epoch > 0 and every_n_steps % steps_per_epoch == 0


def epochs(steps: int, steps_per_epoch: int) -> float:
    return steps / steps_per_epoch if steps_per_epoch else 0.0


def explain(the_plan: Plan, max_steps: int, save_every: int, preview_every: int) -> list[str]:
    """The plan in sentences (Markdown), for the Train panel."""
    p = the_plan
    epoch_word = "step" if p.steps_per_epoch == 1 else "steps"
    lines = [
        f"**{p.images} images** · batch {p.batch_size} × accumulation {p.gradient_accumulation} = "
        f"**{p.images_per_step} images per step** · **{p.steps_per_epoch} {epoch_word} per epoch**",
        *p.notes,
    ]
    if p.divides_evenly:
        lines.append("Every image is used exactly once per epoch.")
    else:
        below, above = nearby_dataset_sizes(p.images, p.images_per_step)
        sizes = " or ".join(str(n) for n in (below, above) if n)
        lines.append(
            f"{p.sitting_out} of {p.images} images sit out each epoch (a different few each time). "
            f"Pick an even split below, or use {sizes} images for this batch × accumulation."
        )
    if max_steps > 0:
        lines.append(f"Max steps {max_steps} = {epochs(max_steps, p.steps_per_epoch):g} epochs.")
    for what, every in (("copies", save_every), ("previews", preview_every)):
        if every <= 0:
            continue
        if is_aligned(every, p.steps_per_epoch):
            lines.append(f"Saving {what} every {every} steps = {_epoch_count(every // p.steps_per_epoch)}.")
        else:
            aligned = nearest_aligned(every, p.steps_per_epoch)
            lines.append(
                f"Saving {what} every {every} steps lands mid-epoch; every {aligned} steps "
                f"({_epoch_count(aligned // p.steps_per_epoch)}) would line up with whole epochs."
            )
    return lines


def start_lines(the_plan: Plan, initial_step: int, end_step: int) -> list[str]:
    """The plan in plain sentences, as a run announces it when it starts (CLI, panel log, API messages)."""
    p = the_plan
    steps = end_step - initial_step
    span = f"steps {initial_step + 1}-{end_step}" if initial_step else f"{end_step} steps"
    lines = [
        f"Plan: {p.images} images; batch {p.batch_size} x accumulation {p.gradient_accumulation} = "
        f"{p.images_per_step} images per step; {p.steps_per_epoch} step{'s' * (p.steps_per_epoch != 1)} per "
        f"epoch; {span} = {epochs(steps, p.steps_per_epoch):g} epochs.",
        *p.notes,
    ]
    if not p.divides_evenly:
        lines.append(f"{p.sitting_out} of {p.images} images sit out each epoch (a different few each time).")
    return lines


def _epoch_count(count: int) -> str:
    return "every epoch" if count == 1 else f"every {count} epochs"
