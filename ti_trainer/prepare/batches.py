"""Which batch size x gradient accumulation combinations use every image of a dataset once per epoch.

The seed tutorial's arithmetic, done for the artist: with 33 images, batch 3 x accumulation 11 trains on all
of them in one step; with 17 (a prime) only batch 1 fits, unless an image is dropped or added. The
combinations and their steps per epoch are the Train panel's (training/batch_plan.py), grouped by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ti_trainer.training.batch_plan import even_combinations


@dataclass
class BatchPlan:
    batch: int
    accumulations: list[int]  # each divides count/batch: no image is left out of an epoch
    steps_per_epoch: list[int]  # optimizer steps per epoch, one per accumulation

    def text(self, count: int) -> str:
        options = ", ".join(
            f"x{acc} ({steps} step{'s' if steps != 1 else ''}/epoch)"
            for acc, steps in zip(self.accumulations, self.steps_per_epoch)
        )
        return f"batch {self.batch}: accumulation {options}"


def batch_plans(count: int, max_batch: int = 8) -> list[BatchPlan]:
    """Every even batch x accumulation for `count` images, smallest batch and accumulation first."""
    plans: dict[int, BatchPlan] = {}
    for combination in reversed(even_combinations(count, max_batch, per_batch=None)):
        plan = plans.setdefault(combination.batch_size, BatchPlan(combination.batch_size, [], []))
        plan.accumulations.append(combination.gradient_accumulation)
        plan.steps_per_epoch.append(combination.steps_per_epoch)
    return list(plans.values())


def nearby_counts(count: int, max_batch: int = 8, reach: int = 3) -> list[tuple[int, list[int]]]:
    """When no batch above 1 divides `count`: the nearest smaller and larger counts that allow one, with those batches."""
    if count < 2 or any(count % batch == 0 for batch in range(2, min(max_batch, count) + 1)):
        return []
    found = []
    for direction in (-1, 1):
        for distance in range(1, reach + 1):
            other = count + direction * distance
            batches = [b for b in range(2, min(max_batch, other) + 1) if other > 0 and other % b == 0]
            if batches:
                found.append((other, batches))
                break
    return found
