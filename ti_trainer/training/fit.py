"""What fits in GPU memory, found with real training steps; and out-of-memory turned into advice.

The seed tutorial finds its batch size by trial and error (reference: seeds/000). Here a probe runs the real
training step (the text encoder with injected vectors, the UNet, the loss, the backward pass) on the real
backend at the real size, with random latents: memory does not depend on the values. The largest batch that
fits is found by doubling, then bisecting. An out-of-memory error is caught, the memory it left behind is
released (the failed step's frames are cleared, the allocator's cache emptied), and the model is as it was:
nothing of the probe stays registered, and no weight holds a gradient.

`memory_for_training` is the context a run trains in: the run's memory plan (on a GPU, "auto" checkpointing
is raised block by block, and SDXL's text encoders lent, only if the batch needs it: memory/plan.py
`escalation` says in which order), reported in words, applied, and undone afterwards. An out-of-memory during
the run becomes a UserError naming the batch, or the size, that would fit.
"""

from __future__ import annotations

import contextlib
import gc
import math
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.vectors import map_vectors
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import CHECKPOINT_LEVELS, MemoryPlan, escalation, lending_asked, plan_for
from ti_trainer.training.step import step_loss

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend
    from ti_trainer.training.data import TrainingData

PROBE_NAME = "tiprobevectors"  # registered with the prompt chunker only while a probe step runs
PROBE_SEED = 0
SMALLEST_SIDE_PX = 256
LENT = "+lent"  # in a FitReport's keys: the level, with the text encoders lent

Step = Callable[[int], None]  # runs one training step at the given batch size


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(step: Step, batch: int) -> bool:
    """Run `step(batch)`; False if it ran out of memory (and the memory it held is released)."""
    out_of_memory = False
    try:
        step(batch)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        # The traceback's frames hold the failed step's activations; clear them so the memory can go.
        traceback.clear_frames(error.__traceback__)
        out_of_memory = True
    if out_of_memory:
        release_memory()  # a step that succeeded freed its tensors when it returned
    return not out_of_memory


def largest_batch(step: Step, limit: int = 64, start: int | None = None) -> int:
    """The largest batch <= `limit` that fits: doubling from `start` (an estimate's guess; 1 without one),
    then bisecting. 0 if not even batch 1. A good guess costs two probes instead of a dozen."""
    fitting, failing, batch = 0, limit + 1, max(1, min(start or 1, limit))
    while batch <= limit:  # a guess too high fails at once, and the bisection below it finds the batch
        if not fits(step, batch):
            failing = batch
            break
        fitting = batch
        if batch == limit:
            break
        batch = min(batch * 2, limit)
    while failing - fitting > 1:
        middle = (fitting + failing) // 2
        if fits(step, middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def gpu_budget_bytes(device: torch.device) -> int | None:
    """What PyTorch can use on `device` now: the free memory plus what its own cache already holds (None off
    a GPU, where nothing is probed against a budget)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def training_step_probe(
    backend: Backend, latent_hw: tuple[int, int], precision: str, num_vectors: int = 1
) -> Step:
    """One real training step on `backend` at latent size `latent_hw`, as the loop runs it, on random data."""
    device = backend.device
    channels = backend.family.latent_channels

    def step(batch: int) -> None:
        generator = torch.Generator().manual_seed(PROBE_SEED)  # the global RNG is left alone
        chunker = backend.prompt_encoder.chunker
        chunker.register(PROBE_NAME, num_vectors)
        try:
            zeros = backend.family.zero_vectors(num_vectors, device)  # a tensor, or one per text encoder
            vectors = map_vectors(zeros, lambda tensor: tensor.requires_grad_(True))
            latents = torch.randn(batch, channels, *latent_hw, generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, backend.schedule.num_timesteps, (batch,), generator=generator)
            prompts = [PROBE_NAME] * batch
            step_loss(
                backend, prompts, latents, noise, timesteps, None, {PROBE_NAME: vectors}, precision
            ).backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            chunker.unregister(PROBE_NAME)

    return step


def smaller_sizes(latent_hw: tuple[int, int], vae_scale_factor: int) -> list[tuple[int, int]]:
    """Latent sizes below `latent_hw`, about the same aspect ratio, the longer side 8 latents smaller each
    time. Both sides stay multiples of 8 latents, which SD's three downsamplings need in ldm's UNet."""
    height, width = latent_hw
    longer = max(height, width)
    sizes = []
    for side in range(longer - 8, SMALLEST_SIDE_PX // vae_scale_factor - 1, -8):
        scale = side / longer
        size = (max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8))
        if size not in sizes:
            sizes.append(size)
    return sizes


def size_px(backend: Backend, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in image pixels of a latent size `(height, width)` on `backend`'s model."""
    factor = backend.family.vae_scale_factor
    return latent_hw[1] * factor, latent_hw[0] * factor


def px(latent_hw: tuple[int, int], vae_scale_factor: int) -> str:
    return f"{latent_hw[1] * vae_scale_factor}x{latent_hw[0] * vae_scale_factor}"


def _advice(
    backend: Backend,
    plan: MemoryPlan,
    batch: int,
    accumulation: int,
    latent_hw: tuple[int, int],
    num_vectors: int,
    what: str,
) -> str:
    """Find what fits under `plan` (with the levers applied) and say it to the artist."""
    factor = backend.family.vae_scale_factor
    step = training_step_probe(backend, latent_hw, plan.precision, num_vectors)
    with backend.memory_levers(plan):
        fitting = largest_batch(step, max(1, batch - 1)) if batch > 1 else 0
        size = None
        if not fitting:
            for smaller in smaller_sizes(latent_hw, factor):
                if fits(training_step_probe(backend, smaller, plan.precision, num_vectors), 1):
                    size = smaller
                    break
    text = f"{what} at batch {batch}, {px(latent_hw, factor)} px (memory: {backend.describe_memory(plan)})."
    if fitting:
        images = batch * accumulation
        steps = math.ceil(images / fitting)
        return (
            f"{text} Batch {fitting} fits at this size: set the batch size to {fitting} and gradient "
            f"accumulation to {steps} to keep about {images} images per step."
        )
    if size is not None:
        return (
            f"{text} Even batch 1 does not fit at this size; {px(size, factor)} px fits at batch 1. Train at "
            "that size, or free GPU memory (close other programs that use the GPU) and try again."
        )
    advice = "Free GPU memory (close other programs that use the GPU)"
    if plan.precision == "fp32":
        advice += ", and set the precision to auto: fp32 weights and activations take twice the memory"
    return (
        f"{text} Batch 1 does not fit at this size, nor at any smaller one down to {SMALLEST_SIDE_PX} px: "
        f"the model itself barely fits. {advice}."
    )


def largest_latent_size(data: TrainingData) -> tuple[int, int]:
    """The largest latent size (by area) among a run's images: the size the batch must fit at."""
    return max((image.size for image in data.images), key=lambda hw: hw[0] * hw[1])


def least_costly_fitting(
    backend: Backend,
    candidates: list[MemoryPlan],
    batch: int,
    latent_hw: tuple[int, int],
    num_vectors: int = 1,
) -> MemoryPlan | None:
    """The first of `candidates` (least costly first) at which a training step at `batch` fits; None if it
    fits at none."""
    step = training_step_probe(backend, latent_hw, candidates[0].precision, num_vectors)
    for candidate in candidates:
        with backend.memory_levers(candidate):
            if fits(step, batch):
                return candidate
    return None


def checkpointing_by_need(
    backend: Backend,
    plan: MemoryPlan,
    batch: int,
    latent_hw: tuple[int, int],
    num_vectors: int = 1,
    levels: tuple[str, ...] = CHECKPOINT_LEVELS,
) -> MemoryPlan | None:
    """The plan with the least checkpointing among `levels` (off, high-res, all) at which a training step
    at `batch` fits; None if it fits at none."""
    candidates = [plan.with_checkpointing(level) for level in levels]
    return least_costly_fitting(backend, candidates, batch, latent_hw, num_vectors)


def _candidates_from_estimate(
    candidates: list[MemoryPlan],
    backend: Backend,
    latent_hw: tuple[int, int],
    batch: int,
    num_vectors: int,
) -> list[MemoryPlan]:
    """The candidates left to probe once the estimate has ruled out those before the first it says fits."""
    from ti_trainer.vram.for_config import first_fitting

    budget = gpu_budget_bytes(backend.device)
    if budget is None:
        return candidates
    start = first_fitting(candidates, backend, *size_px(backend, latent_hw), batch, num_vectors, budget)
    return candidates[start:] if start is not None else candidates


@contextlib.contextmanager
def memory_for_training(
    plan: MemoryPlan,
    backend: Backend,
    data: TrainingData,
    num_vectors: int,
    *,
    auto_checkpointing: bool,
    auto_lending: bool = False,
    say: Callable[[str], None] = print,
    probe_first: bool | None = None,
    say_estimate: bool | None = None,
) -> Iterator[MemoryPlan]:
    """The memory context a run trains in, under the run's `plan` (see the module's docstring); yields the
    plan as applied. `probe_first` (default: on a GPU) runs test steps before the run: with
    `auto_checkpointing` (the config's "auto") checkpointing is raised by need, with `auto_lending` (the
    config's "auto" on a model that can lend) the text encoders are lent by need, in memory/plan.py
    `escalation`'s order; a batch that cannot fit is reported before any training time is spent.
    `say_estimate` (default: on a GPU; on the CPU it costs seconds and says nothing about the run) adds the
    VRAM estimate's line for the plan to the messages."""
    latent_hw = largest_latent_size(data)
    batch, accumulation = data.batch_size, data.gradient_accumulation
    if probe_first is None:
        probe_first = backend.device.type == "cuda"
    if probe_first:
        candidates = escalation(plan, checkpointing=auto_checkpointing, lending=auto_lending)
        if len(candidates) > 1:
            candidates = _candidates_from_estimate(candidates, backend, latent_hw, batch, num_vectors)
        needed = least_costly_fitting(backend, candidates, batch, latent_hw, num_vectors)
        if needed is None:
            most_saving = candidates[-1]
            what = "Training would run out of GPU memory"
            raise UserError(_advice(backend, most_saving, batch, accumulation, latent_hw, num_vectors, what))
        plan = needed
    say(f"Memory: {backend.describe_memory(plan)}")
    if say_estimate if say_estimate is not None else backend.device.type == "cuda":
        line = _estimate_line(plan, backend, latent_hw, batch, num_vectors)
        if line:
            say(line)
    out_of_memory = False
    try:
        with backend.memory_levers(plan):
            yield plan
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        traceback.clear_frames(error.__traceback__)  # free the failed step's activations
        out_of_memory = True
    if not out_of_memory:
        return
    release_memory()
    from ti_trainer.vram.for_config import estimate_note

    raise UserError(
        _advice(backend, plan, batch, accumulation, latent_hw, num_vectors, "Training ran out of GPU memory")
        + estimate_note(plan, backend, *size_px(backend, latent_hw), batch, num_vectors)
        + " The embedding keeps its last saved step; start again to resume from it."
    ) from None


def _estimate_line(
    plan: MemoryPlan, backend: Backend, latent_hw: tuple[int, int], batch: int, num_vectors: int
) -> str:
    from ti_trainer.vram.for_config import run_estimate_line

    width, height = size_px(backend, latent_hw)
    return run_estimate_line(
        plan, backend, width, height, batch, num_vectors, gpu_budget_bytes(backend.device)
    )


@dataclass
class FitReport:
    latent_hw: tuple[int, int]
    # checkpointing level (+LENT: with the text encoders lent) -> the largest batch that fits (up to the limit)
    batches: dict[str, int]
    plan: MemoryPlan
    vae_scale_factor: int

    @property
    def best(self) -> tuple[str, int]:
        """The least checkpointing that reaches the largest batch found."""
        most = max(self.batches.values())
        return next((level, b) for level, b in self.batches.items() if b == most)

    def describe(self) -> str:
        words = {"off": "with checkpointing off", "high-res": "with the high-resolution blocks checkpointed"}
        parts = [
            f"batch {b or 'none'} {words.get(key.removesuffix(LENT), 'with every block checkpointed')}"
            + (" and the text encoders lent" if key.endswith(LENT) else "")
            for key, b in self.batches.items()
        ]
        return f"At {px(self.latent_hw, self.vae_scale_factor)} px: " + "; ".join(parts) + "."


def find_largest_batch(
    config: TrainConfig, backend: Backend, limit: int = 64, num_vectors: int = 1
) -> FitReport:
    """The largest batch at the config's size for each plan it allows (on "auto", every checkpointing level,
    each with the text encoders lent too where "auto" may lend them; least costly first, stopping once the
    limit is reached). Runs real training steps: meant for a GPU, where each takes a fraction of a second;
    the model is left as it was."""
    plan = plan_for(config, backend)
    factor = backend.family.vae_scale_factor
    latent_hw = (config.height // factor, config.width // factor)
    candidates = escalation(
        plan,
        checkpointing=config.gradient_checkpointing == "auto",
        lending=lending_asked(config, backend) == "auto",
    )
    batches: dict[str, int] = {}
    budget = gpu_budget_bytes(backend.device)
    with backend.training_session():
        step = training_step_probe(backend, latent_hw, plan.precision, num_vectors)
        for candidate in candidates:
            key = candidate.checkpointing + (LENT if candidate.text_encoders_lent else "")
            guess = None
            if budget is not None:
                from ti_trainer.vram.for_config import largest_estimated_batch

                guess = largest_estimated_batch(
                    candidate, backend, config.width, config.height, num_vectors, budget, limit
                )
            with backend.memory_levers(candidate):
                batches[key] = largest_batch(step, limit, start=guess)
            if batches[key] >= limit:
                break
    return FitReport(latent_hw, batches, plan, factor)
