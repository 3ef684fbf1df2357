"""The training loop: one function you can read top to bottom.

Only the embedding's vectors learn: the backend's weights are frozen, and AdamW holds the vectors alone.
Every random draw (images in a batch, prompt template and tags, noise, timesteps) comes from generators seeded
by (seed, micro-batch index), so a run resumed from a saved step ends with the same vectors as one that never
stopped.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image

from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.vectors import Vectors, detached_copy, map_vectors, vector_tensors
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import MemoryPlan, lending_asked
from ti_trainer.memory.precision import grad_scaler
from ti_trainer.training import batch_plan, fit, outputs
from ti_trainer.training.data import TrainingData, encode_dataset, prepare_images
from ti_trainer.training.run_lock import embedding_lock
from ti_trainer.training.settings_history import resume_changes_message
from ti_trainer.training.setup import PreparedRun, prepare_run
from ti_trainer.training.step import step_loss

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

MAX_CONSECUTIVE_BAD_STEPS = 10


@dataclass
class StepReport:
    step: int
    end_step: int
    loss: float
    learn_rate: float
    epoch: int  # from 0, as in the loss CSV (outputs.epoch_of)
    skipped: bool
    seconds: float


@dataclass
class RunContext:
    """What a monitor may read about the run it watches (it must not change any of it)."""

    config: TrainConfig
    backend: Backend
    data: TrainingData
    folders: outputs.RunFolders
    embedding_name: str
    seed: int
    initial_step: int
    end_step: int
    memory_plan: MemoryPlan  # the run's one plan, as applied: monitors that run the model compute in it

    @property
    def precision(self) -> str:
        return self.memory_plan.precision


@dataclass
class TrainingPass:
    """One micro-batch as training computed it, for a monitor that learns from the passes themselves (the
    per-image report): values on the run's device, never synced by the loop, to be read and not changed."""

    step: int  # the step the pass belongs to (as `after_step` numbers it)
    images: list[int]  # indices into `RunContext.data.images`
    loss: torch.Tensor  # the micro-batch's mean loss, 0-dim
    gradient: torch.Tensor  # d loss / d vectors of this micro-batch alone, in true units (loss scale undone)


class TrainingMonitor(Protocol):
    """Watches a run (validation loss, early stopping, norms...). `after_step` returns True to ask the run
    to stop at this step boundary; the run then saves as on Interrupt. A monitor may also define
    `after_pass(TrainingPass)`, called after every micro-batch's backward pass."""

    def start(self, context: RunContext) -> None: ...

    def after_step(self, step: int, vectors: Vectors) -> bool: ...

    def finish(self, step: int) -> None: ...


@dataclass
class TrainingHooks:
    """How a host follows and steers a run. All optional."""

    on_step: Callable[[StepReport], None] = lambda report: None
    on_message: Callable[[str], None] = print
    should_stop: Callable[[], bool] = lambda: False
    render_preview: Callable[[PreviewRequest], Image.Image | None] | None = None
    on_saved: Callable[[Path], None] = lambda path: None
    on_preview: Callable[[Path], None] = lambda path: None
    monitors: list[TrainingMonitor] = field(default_factory=list)


@dataclass
class TrainResult:
    embedding_path: Path
    log_folder: Path
    steps_done: int
    interrupted: bool
    skipped_steps: list[int] = field(default_factory=list)
    last_loss: float = float("nan")
    stopped_by_monitor: bool = False

    @property
    def summary(self) -> str:
        state = "interrupted" if self.interrupted else "finished"
        text = f"Training {state} at {self.steps_done} steps. Embedding saved to {self.embedding_path}"
        if self.skipped_steps:
            text += f" ({len(self.skipped_steps)} step(s) skipped for a non-finite loss)"
        return text


def step_generator(seed: int, micro_index: int) -> torch.Generator:
    """A generator for one micro-batch, derived from the run's seed by an explicit (version-stable) mix."""
    mixed = (seed * 6364136223846793005 + (micro_index + 1) * 1442695040888963407) % (2**63)
    return torch.Generator().manual_seed(mixed)


def train(config: TrainConfig, backend: Backend, hooks: TrainingHooks | None = None) -> TrainResult:
    hooks = hooks or TrainingHooks()
    # A backend over a model it does not own (the WebUI's) borrows it for the run and gives it back as it
    # found it, however the run ends.
    with backend.training_session():
        return _train(config, backend, hooks)


def _train(config: TrainConfig, backend: Backend, hooks: TrainingHooks) -> TrainResult:
    run = prepare_run(config, backend)  # every check that needs no GPU work
    for message in run.messages:
        hooks.on_message(message)
    # A second run of the same embedding is refused here, before any GPU work: the two would interleave
    # their loss logs and overwrite each other's copies.
    with embedding_lock(run.embedding_path, hooks.on_message):
        return _locked_train(run, backend, hooks)


def _locked_train(run: PreparedRun, backend: Backend, hooks: TrainingHooks) -> TrainResult:
    config = run.config
    folders = outputs.RunFolders.for_run(config.log_dir, run.embedding.name)
    run.embedding.sd_checkpoint = backend.model_hash
    run.embedding.sd_checkpoint_name = backend.model_name

    prepared = prepare_images(
        run.folder.images,
        config.width,
        config.height,
        config.keep_size,
        config.aspect_buckets,
        backend.family.bucket_max_ratio,
    )
    images = encode_dataset(backend, prepared, config.latent_sampling, config.use_alpha_weight, run.seed)
    data = TrainingData(images, config.batch_size, config.gradient_accumulation, run.seed)
    for line in batch_plan.start_lines(data.plan, run.initial_step, run.end_step):
        hooks.on_message(line)
    # The settings record what the run did (the batch and accumulation capped to the dataset), so --config
    # reproduces it, and what was asked for beside it.
    used = dataclasses.replace(
        config, batch_size=data.batch_size, gradient_accumulation=data.gradient_accumulation
    )
    if run.initial_step > 0:  # before this run's own settings file is written, which would be the latest
        changes = resume_changes_message(config.log_dir, used, run.initial_step)
        if changes:
            hooks.on_message(changes)
    outputs.write_settings(
        folders,
        used,
        {
            "requested": {
                "batch_size": config.batch_size,
                "gradient_accumulation": config.gradient_accumulation,
            },
            "model_name": backend.model_name,
            "model_hash": backend.model_hash,
            "num_of_dataset_images": len(images),
            "num_vectors_per_token": run.embedding.num_vectors,
            "initial_step": run.initial_step,
            "template_file": str(run.template.path),
        },
    )
    loss_log = outputs.LossLog(folders.loss_csv, data.steps_per_epoch, run.initial_step)
    # The run's memory plan (attention, checkpointing, VAE in RAM, precision, lent text encoders), worked out
    # once in prepare_run, holds for the run and is undone after; "auto" levers are raised by need, and running
    # out of GPU memory ends the run with a message naming the batch or size that fits (fit.py).
    with fit.memory_for_training(
        run.memory_plan,
        backend,
        data,
        run.embedding.num_vectors,
        auto_checkpointing=config.gradient_checkpointing == "auto",
        auto_lending=lending_asked(config, backend) == "auto",
        say=hooks.on_message,
    ) as plan:
        context = RunContext(
            config,
            backend,
            data,
            folders,
            run.embedding.name,
            run.seed,
            run.initial_step,
            run.end_step,
            plan,
        )
        for monitor in hooks.monitors:
            monitor.start(context)
        return _loop(run, backend, hooks, folders, data, loss_log, plan.precision)


def _loop(
    run: PreparedRun, backend: Backend, hooks, folders, data: TrainingData, loss_log, precision: str
) -> TrainResult:
    config, embedding, name = run.config, run.embedding, run.embedding.name
    device = backend.device
    # One tensor, or one per text encoder (SDXL): the optimizer trains all of them.
    vectors = map_vectors(embedding.vectors, lambda tensor: tensor.to(device).requires_grad_(True))
    parameters = vector_tensors(vectors)
    optimizer = torch.optim.AdamW(
        parameters, lr=run.learn_rate.value_at(run.initial_step), weight_decay=config.weight_decay
    )
    if run.optimizer_state is not None:
        optimizer.load_state_dict(run.optimizer_state["optimizer_state_dict"])
        hooks.on_message(f"Loaded optimizer state from {run.embedding_path.name}.optim")
    scaler = grad_scaler(precision, device)
    accumulation = data.gradient_accumulation
    resume_state = {"seed": run.seed}

    def optimizer_state() -> dict | None:
        return optimizer.state_dict() if config.save_optimizer_state else None

    def sync_embedding(step: int) -> None:
        # A copy to the CPU waits for the GPU: made only when the vectors are saved or previewed.
        embedding.vectors = detached_copy(vectors)
        embedding.step = step

    pass_monitors = [monitor for monitor in hooks.monitors if hasattr(monitor, "after_pass")]

    _render_missed_preview(run, backend, hooks, folders, data)
    step, skipped, bad_in_a_row, interrupted, loss_value = run.initial_step, [], 0, False, float("nan")
    stopped_by_monitor = False
    for step_index in range(run.initial_step, run.end_step):
        if hooks.should_stop():
            interrupted = True
            break
        started = time.perf_counter()
        learn_rate = run.learn_rate.value_at(step_index)
        for group in optimizer.param_groups:
            group["lr"] = learn_rate
        optimizer.zero_grad(set_to_none=True)

        # The losses stay on the device and are read once per step: a read per micro-batch would stall the GPU.
        micro_losses, first_prompt = [], ""
        for micro in range(accumulation):
            micro_index = step_index * accumulation + micro
            generator, batch, prompts = _micro_batch(run, data, micro_index)
            first_prompt = first_prompt or prompts[0]
            noise = torch.randn(batch.latents.shape, generator=generator)
            timesteps = torch.randint(
                0, backend.schedule.num_timesteps, (batch.latents.shape[0],), generator=generator
            )
            loss = step_loss(
                backend, prompts, batch.latents, noise, timesteps, batch.weights, {name: vectors}, precision
            )
            # Averaged over the accumulation group, so the step's loss is the mean of its micro-batches.
            loss = loss / accumulation
            before = _gradient_so_far(vectors) if pass_monitors else None
            (scaler.scale(loss) if scaler else loss).backward()
            micro_losses.append(loss.detach())
            if pass_monitors:
                done = TrainingPass(
                    step_index + 1,
                    batch.indices,
                    loss.detach() * accumulation,
                    _pass_gradient(vectors, before, scaler) * accumulation,
                )
                for monitor in pass_monitors:
                    monitor.after_pass(done)
        loss_value = sum(torch.stack(micro_losses).cpu().tolist())  # in float64, as the CSV always had it

        if scaler:
            scaler.unscale_(optimizer)  # clip thresholds are in true gradient units, unlike A1111's
        gradients = [parameter.grad for parameter in parameters]
        finite = (
            math.isfinite(loss_value)
            and all(gradient is not None for gradient in gradients)
            and all(bool(torch.isfinite(gradient).all()) for gradient in gradients)
        )
        if step_index == run.initial_step and finite and not sum(g.abs().sum() for g in gradients) > 0:
            raise UserError(
                f"No gradient reached {name!r}: its vectors would never change. Check that the prompt template "
                "puts [name] in every prompt and that the model's text encoder is the one the embedding is for."
            )
        if finite:
            if run.clip_value is not None:
                limit = run.clip_value.value_at(step_index)
                if config.clip_grad_mode == "value":
                    torch.nn.utils.clip_grad_value_(parameters, limit)
                else:
                    # With one tensor per encoder, their joint norm: one limit, as for one tensor.
                    torch.nn.utils.clip_grad_norm_(parameters, limit)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            bad_in_a_row = 0
        else:
            # A NaN/inf never reaches the vectors: the update is dropped and the last good vectors kept.
            if scaler:
                scaler.update()
            skipped.append(step_index + 1)
            bad_in_a_row += 1
            hooks.on_message(
                f"Step {step_index + 1}: the loss was not finite; update skipped, vectors unchanged."
            )
            if bad_in_a_row >= MAX_CONSECUTIVE_BAD_STEPS:
                sync_embedding(step_index + 1 - bad_in_a_row)
                outputs.save_current(
                    embedding, run.embedding_path, optimizer_state(), resume_state, run.source_path
                )
                raise UserError(
                    f"{bad_in_a_row} steps in a row gave a non-finite loss; training stopped and the last good "
                    f"vectors were saved to {run.embedding_path}. Lower the learning rate, or train in fp32/bf16."
                )
        step = step_index + 1
        epoch, _ = outputs.epoch_of(step, data.steps_per_epoch)
        hooks.on_step(
            StepReport(
                step, run.end_step, loss_value, learn_rate, epoch, not finite, time.perf_counter() - started
            )
        )
        if config.write_csv_every and step % config.write_csv_every == 0 and finite:
            loss_log.write(step, loss_value, learn_rate)
        if config.save_every and step % config.save_every == 0:
            sync_embedding(step)
            hooks.on_saved(
                outputs.save_step_copy(
                    folders, embedding, optimizer_state(), resume_state, config.save_format
                )
            )
            outputs.save_current(
                embedding, run.embedding_path, optimizer_state(), resume_state, run.source_path
            )
        if config.preview_every and step % config.preview_every == 0:
            sync_embedding(step)
            _preview(run, backend, hooks, folders, first_prompt)
        watched = map_vectors(vectors, torch.Tensor.detach)
        stop_requests = [monitor.after_step(step, watched) for monitor in hooks.monitors]
        if any(stop_requests):
            stopped_by_monitor = True
            break

    sync_embedding(step)
    if config.save_every and step % config.save_every and step > run.initial_step:
        # The last step gets a copy too, so the choice among copies includes where the run ended.
        hooks.on_saved(
            outputs.save_step_copy(folders, embedding, optimizer_state(), resume_state, config.save_format)
        )
    outputs.save_current(embedding, run.embedding_path, optimizer_state(), resume_state, run.source_path)
    hooks.on_saved(run.embedding_path)
    for monitor in hooks.monitors:
        monitor.finish(step)
    return TrainResult(
        run.embedding_path, folders.root, step, interrupted, skipped, loss_value, stopped_by_monitor
    )


def _flat_gradient(vectors: Vectors) -> torch.Tensor | None:
    """The vectors' gradient so far, fp32: one set's as it is shaped, or every encoder's flattened into one
    (in `vector_tensors` order: the per-image report only compares gradients' directions and lengths)."""
    grads = [tensor.grad for tensor in vector_tensors(vectors)]
    if any(grad is None for grad in grads):
        return None
    if len(grads) == 1:
        return grads[0].detach().float().clone()
    return torch.cat([grad.detach().float().flatten() for grad in grads])


def _gradient_so_far(vectors: Vectors) -> torch.Tensor | None:
    return _flat_gradient(vectors)


def _pass_gradient(vectors: Vectors, before: torch.Tensor | None, scaler) -> torch.Tensor:
    """What the last backward pass added to the vectors' gradient (flattened over every encoder's vectors),
    with the loss scale undone (on the device: the scale is read as a tensor, so nothing waits for the GPU)."""
    added = _flat_gradient(vectors) - (0 if before is None else before)
    if scaler is None:
        return added
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler.get_scale()
    return added / scale


def _micro_batch(run: PreparedRun, data: TrainingData, micro_index: int):
    """The generator, batch and prompts of one micro-batch: the same every time for the same index."""
    generator = step_generator(run.seed, micro_index)
    batch = data.micro_batch(micro_index, generator)
    prompt_rng = random.Random(f"prompt:{run.seed}:{micro_index}")
    return generator, batch, [run.prompts(caption, prompt_rng) for caption in batch.captions]


def _render_missed_preview(run: PreparedRun, backend: Backend, hooks: TrainingHooks, folders, data) -> None:
    """Render the preview of the step resumed from when the run that saved it was stopped before its preview
    (the save comes first), so every preview step of the run has its image. The prompt is the one that step
    drew, so the image is the one the first run would have made."""
    step, every = run.initial_step, run.config.preview_every
    if not every or step == 0 or step % every:
        return
    if (folders.images / f"{run.embedding.name}-{step}.png").exists():
        return
    hooks.on_message(f"Rendering the preview of step {step}, which the earlier run did not get to.")
    micro_index = (step - 1) * data.gradient_accumulation
    _preview(run, backend, hooks, folders, _micro_batch(run, data, micro_index)[2][0])


def _preview(run: PreparedRun, backend: Backend, hooks: TrainingHooks, folders, batch_prompt: str) -> None:
    config, embedding = run.config, run.embedding
    request = PreviewRequest(
        prompt=config.preview_prompt or batch_prompt,
        negative_prompt=config.preview_negative_prompt,
        steps=config.preview_steps,
        cfg_scale=config.preview_cfg_scale,
        seed=config.preview_seed,
        width=config.preview_width or config.width,
        height=config.preview_height or config.height,
        sampler=config.preview_sampler,
        vectors={embedding.name: embedding.vectors},
    )
    render = hooks.render_preview or backend.render
    # A backend that lends parts of its model out while training (VAE in RAM, WebUI placement) takes them back.
    with backend.previewing():
        image = render(request)
    if image is None:
        return
    infotext = (
        f"{request.prompt}\nNegative prompt: {request.negative_prompt}\nSteps: {request.steps}, Sampler: "
        f"{request.sampler}, CFG scale: {request.cfg_scale}, Seed: {request.seed}, Size: {request.width}x"
        f"{request.height}, Model: {embedding.sd_checkpoint_name}"
    )
    hooks.on_preview(outputs.save_preview(folders, embedding, image, infotext))
    if config.save_image_with_embedding:
        outputs.save_preview_with_embedding(folders, embedding, image)
