"""The monitors a run gets, built from its TrainConfig in one place: `monitors_for(config)`.

They watch through `TrainingHooks.monitors` (training/loop.py): `start(context)`, `after_step(step,
vectors) -> stop?` at every step boundary, `finish(step)`. They only read the run and write their own files in
its log folder; every random draw they make comes from their own seeded generators, so a run with monitors
trains exactly the vectors it would train without them.

What they cost, and the cadences that keep it small (with default settings they add under 5% to a run's
time: benchmarks/bench_monitors.py, docs/monitors.md):

- validation loss: one forward pass of a fixed batch of 4-8 samples, under no_grad, in the run's precision,
  every `validate_every` steps (default 50, the `save_every` default: each point of the curve is then a step
  with a saved copy to choose, and the DVAR window of 200 steps still holds 5 points). When the run trains
  without gradient checkpointing, the whole batch goes through the UNet in one call: a forward pass without
  gradients holds far less than the activations a training batch keeps for its backward pass.
- vector norms: a length per vector, read from the device every `NORM_EVERY_STEPS` steps (or the validation
  cadence, if shorter): the overbake rule's streak of 3 checks then spans 30 steps.
- per-image report: from the training passes themselves at batch size 1 (free); on the probe batch at the
  start and end otherwise (image_report.py says why).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ti_trainer.analysis import early_stopping, norms
from ti_trainer.analysis.fixed_batch import (
    fixed_prompts,
    probe_batch,
    sample_losses,
    validation_batch,
    validation_sample_count,
)
from ti_trainer.analysis.image_report import (
    REPORT_PASSES,
    ImageRow,
    PassTally,
    dominant,
    image_rows,
    write_image_report,
)
from ti_trainer.analysis.run_files import (
    IMAGE_REPORT_CSV,
    NORMS_CSV,
    VALIDATION_COLUMNS,
    VALIDATION_CSV,
    CsvLog,
    number,
    read_rows,
    update_summary,
)
from ti_trainer.backends.loading import compare_command
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import existing_embedding_file
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.embeddings.vectors import Vectors, detached_copy, map_vectors
from ti_trainer.training import outputs

if TYPE_CHECKING:
    from ti_trainer.training.loop import RunContext, TrainingPass

Message = Callable[[str], None]
ValidationPoint = Callable[[int, float], None]

# A norm check is a few numbers and one read from the device: often enough that the overbake rule's streak of
# CONSECUTIVE_CHECKS (3) checks spans 30 steps, whatever the validation cadence.
NORM_EVERY_STEPS = 10


def monitors_for(
    config: TrainConfig, on_message: Message = print, on_validation_loss: ValidationPoint | None = None
) -> list:
    """The monitors this config asks for: the vector norms, and with validation on, the validation loss (with
    the DVAR rule) and the per-image report. `on_validation_loss(step, loss)` hears every point of the
    validation curve, a resumed run's history too."""
    cadences = (config.validate_every, config.save_every, NORM_EVERY_STEPS)
    monitors: list = [NormMonitor(min(every for every in cadences if every > 0), on_message)]
    if config.validate_every > 0:
        monitors.append(
            ValidationMonitor(stopping_rule(config), config.early_stopping, on_message, on_validation_loss)
        )
        monitors.append(ImageReportMonitor(on_message))
    return monitors


def stopping_rule(config: TrainConfig) -> early_stopping.StoppingRule:
    """The rule as this config sets it (also used to re-read a finished run with other settings)."""
    return early_stopping.StoppingRule(
        config.early_stop_window, config.early_stop_threshold, config.validate_every or 10
    )


class ValidationMonitor:
    """The loss on a fixed batch every `rule.every_steps` steps (and at the start and the end), and the DVAR
    rule on it."""

    def __init__(
        self,
        rule: early_stopping.StoppingRule,
        stop_enabled: bool,
        on_message: Message = print,
        on_point: ValidationPoint | None = None,
    ):
        self.rule = rule
        self.stop_enabled = stop_enabled
        self.on_message = on_message
        self.on_point = on_point or (lambda step, loss: None)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.suggested_step: int | None = None
        self._vectors: Vectors | None = None

    def start(self, context: RunContext) -> None:
        self.context = context
        images = context.data.images
        prompts = fixed_prompts(
            context.config, context.embedding_name, [image.caption for image in images], context.seed
        )
        num_timesteps = context.backend.schedule.num_timesteps
        count = validation_sample_count(context.data.batch_size * context.data.gradient_accumulation)
        self.batch = validation_batch(
            images, prompts, context.embedding_name, context.seed, num_timesteps, count
        )
        self.max_batch = evaluation_batch(context, count)
        self.precision = context.precision
        self.log = CsvLog(context.folders.root / VALIDATION_CSV, VALIDATION_COLUMNS, context.initial_step)
        for row in read_rows(self.log.path):  # a resumed run continues its history
            self.steps.append(int(row["step"]))
            self.losses.append(float(row["loss"]))
            self.on_point(self.steps[-1], self.losses[-1])
        # A run resumed after the rule fired was resumed on purpose: it is not stopped a second time.
        self.suggested_step = early_stopping.first_plateau(self.steps, self.losses, self.rule)
        update_summary(
            context.folders.root,
            suggested_step=self.suggested_step,
            stopped_early=False,
            stopping_rule={
                "window_steps": self.rule.window_steps,
                "threshold": self.rule.threshold,
                "every_steps": self.rule.every_steps,
                "enabled": self.stop_enabled,
            },
        )
        initial = _initial_vectors(context)
        if initial is not None and context.initial_step not in self.steps:
            self._evaluate(context.initial_step, initial)

    def after_step(self, step: int, vectors: Vectors) -> bool:
        self._vectors = vectors
        if step % self.rule.every_steps:
            return False
        verdict = self._evaluate(step, vectors)
        if not verdict.plateau or self.suggested_step is not None:
            return False
        self.suggested_step = step
        copy = _save_copy(self.context, step, vectors)
        update_summary(self.context.folders.root, suggested_step=step, stopped_early=self.stop_enabled)
        levelled = (
            f"the validation loss has levelled off (DVAR ratio {verdict.ratio:.3f} < {self.rule.threshold})"
        )
        if not self.stop_enabled:
            self.on_message(
                f"Step {step}: {levelled}. Suggested step: {step}, saved as {copy.name}. Training goes on "
                "(early stopping is off)."
            )
            return False
        self.on_message(
            f"Stopping early at step {step}: {levelled}. Suggested step: {step}, saved as {copy.name}; earlier "
            f"copies stay in {copy.parent}. To train on anyway, train {self.context.embedding_name!r} "
            "again: it resumes from here and is not stopped a second time."
        )
        return True

    def finish(self, step: int) -> None:
        if self._vectors is not None and step not in self.steps:
            self._evaluate(step, self._vectors)

    def _evaluate(self, step: int, vectors: Vectors) -> early_stopping.StoppingCheck:
        losses = sample_losses(self.context.backend, self.batch, vectors, self.max_batch, self.precision)
        loss = float(losses.mean())
        self.steps.append(step)
        self.losses.append(loss)
        self.on_point(step, loss)
        verdict = early_stopping.check(self.losses, self.rule)
        ratio = "" if verdict.ratio is None else number(verdict.ratio)
        self.log.write([step, number(loss), ratio])
        return verdict


def evaluation_batch(context: RunContext, count: int) -> int:
    """How many fixed samples go through the UNet in one no_grad call: all `count` when the run trains
    without checkpointing (its training batch keeps every activation for the backward pass, far more than a
    forward pass of a few samples holds at once), else the training batch, which the memory plan made fit."""
    if context.memory_plan.checkpointing == "off":
        return max(count, context.data.batch_size)
    return context.data.batch_size


class ImageReportMonitor:
    """The per-image report (loss and gradient share of every image). At batch size 1 it is read off the
    training passes: once every image has had `REPORT_PASSES` of them, and at the end. At a larger batch,
    whose passes mix images, it is measured on the probe batch at the start and the end (image_report.py)."""

    def __init__(self, on_message: Message = print):
        self.on_message = on_message
        self.tally: PassTally | None = None
        self.reported: list[int] = []
        self._latest: tuple[int, Vectors] | None = None

    def start(self, context: RunContext) -> None:
        self.context = context
        images = context.data.images
        if context.data.batch_size == 1:
            self.tally = PassTally(images)
            return
        prompts = fixed_prompts(
            context.config, context.embedding_name, [image.caption for image in images], context.seed
        )
        num_timesteps = context.backend.schedule.num_timesteps
        self.probe = probe_batch(images, prompts, context.embedding_name, context.seed, num_timesteps)
        initial = _initial_vectors(context)
        if initial is not None and context.initial_step == 0:
            self._write(0, self._probe_rows(initial))

    def after_pass(self, done: TrainingPass) -> None:
        if self.tally is not None:
            for image in done.images:
                self.tally.add(image, done.loss, done.gradient)

    def after_step(self, step: int, vectors: Vectors) -> bool:
        self._latest = (step, vectors)
        if self.tally is not None and not self.reported and self.tally.has_passes(REPORT_PASSES):
            self._write(step, self.tally.rows())
        return False

    def finish(self, step: int) -> None:
        if step in self.reported:
            return
        if self.tally is not None:
            if self.tally.has_passes(1):  # a run shorter than an epoch has images it never saw
                self._write(step, self.tally.rows())
        elif self._latest is not None and self._latest[0] == step:
            self._write(step, self._probe_rows(self._latest[1]))

    def _probe_rows(self, vectors: Vectors) -> list[ImageRow]:
        context = self.context
        return image_rows(
            context.backend,
            self.probe,
            context.data.images,
            vectors,
            context.data.batch_size,
            context.precision,
        )

    def _write(self, step: int, rows: list[ImageRow]) -> None:
        write_image_report(self.context.folders.root / IMAGE_REPORT_CSV, step, rows)
        first = not self.reported
        self.reported.append(step)
        heavy = dominant({row.image: row.gradient_share for row in rows})
        if heavy and first:
            self.on_message(
                f"Step {step}: {', '.join(heavy)} pull(s) on the embedding much harder than the other images "
                "(gradient share). If one image's look takes over the results, consider culling it."
            )


class NormMonitor:
    """Records the length of every vector every `every_steps` steps (and at the first and last step), and
    warns once per vector when the overbake rule flags it (norms.py: far longer than the model's ordinary
    words and than its own start, for several checks in a row). `analyze` applies the same rule to the CSV.

    With one set of vectors per text encoder (SDXL), each encoder's vectors are measured against that
    encoder's own ordinary words (CLIP-L's and bigG's token lengths differ), each with its own tracker, in
    columns named by the encoder (`clip_l_vector_0`); the summary records each range under `norm_ranges`."""

    def __init__(self, every_steps: int, on_message: Message = print):
        self.every_steps = max(1, every_steps)
        self.on_message = on_message
        self.log: CsvLog | None = None
        self._latest: tuple[int, Vectors] | None = None

    def start(self, context: RunContext) -> None:
        self.context = context
        family = context.backend.family
        self.per_encoder = family.vectors_per_encoder
        self.references = {
            spec.key: norms.ordinary_token_norms(context.backend, spec.key) for spec in family.text_encoders
        }
        self.trackers = {key: norms.OverbakeTracker(reference) for key, reference in self.references.items()}
        if self.per_encoder:
            ranges = {key: reference.to_dict() for key, reference in self.references.items()}
            update_summary(context.folders.root, norm_ranges=ranges)
        else:
            update_summary(context.folders.root, norm_range=next(iter(self.references.values())).to_dict())
        initial = _initial_vectors(context)
        if initial is not None:
            self._record(context.initial_step, initial)

    def _column(self, key: str, index: int) -> str:
        return norms.norm_column(index, key if self.per_encoder else None)

    def _open_log(self, lengths: dict[str, list[float]]) -> None:
        columns = [
            "step",
            *(self._column(key, i) for key, values in lengths.items() for i in range(len(values))),
        ]
        self.log = CsvLog(self.context.folders.root / NORMS_CSV, columns, self.context.initial_step)
        # A resumed run continues its history: the starting lengths and any streak in progress carry over,
        # and a vector already flagged is not warned about a second time.
        for row in read_rows(self.log.path):
            for key, values in lengths.items():
                history = [float(row[self._column(key, i)]) for i in range(len(values))]
                self.trackers[key].check(int(row["step"]), history)

    def after_step(self, step: int, vectors: Vectors) -> bool:
        self._latest = (step, vectors)
        if step % self.every_steps == 0 or step == self.context.initial_step + 1:
            self._record(step, vectors)
        return False

    def finish(self, step: int) -> None:
        if self._latest and self._latest[0] == step:
            self._record(step, self._latest[1])

    def _record(self, step: int, vectors: Vectors) -> None:
        keyed = self.context.backend.family.keyed_vectors(vectors)
        lengths = {key: norms.vector_norms(tensor) for key, tensor in keyed.items()}
        if self.log is None:
            self._open_log(lengths)
        if step in self.log.steps:
            return
        self.log.write([step, *(number(value) for values in lengths.values() for value in values)])
        for key, values in lengths.items():
            fresh = self.trackers[key].check(step, values)
            if fresh:
                self._warn(step, key, fresh, values)

    def _warn(self, step: int, key: str, fresh: list[int], lengths: list[float]) -> None:
        flagged = {index: self.trackers[key].flagged[index] for index in fresh}
        which = f"{key} " if self.per_encoder else ""
        self.on_message(
            f"Step {step}: {self.context.embedding_name!r} may be overbaking: {which}"
            f"{norms.describe_overgrowth(flagged, self.references[key])} (lengths now "
            f"{', '.join(f'{value:.2f}' for value in lengths)}). Compare the steps around "
            f"{min(flagged.values())} with earlier copies (the Results tab, or "
            f"{compare_command(self.context.folders.root, self.context.backend.model_name)})."
        )


def _initial_vectors(context: RunContext) -> Vectors | None:
    """The vectors the run starts from: the embedding file as it is before the first step."""
    path = existing_embedding_file(Path(context.config.embeddings_dir), context.embedding_name)
    if path is None:
        return None
    device = context.backend.device
    return map_vectors(load_embedding(path).vectors, lambda tensor: tensor.to(device))


def _save_copy(context: RunContext, step: int, vectors: Vectors) -> Path:
    """The suggested step as a copy in `embeddings/`, so it is among the steps a comparison shows."""
    existing = context.folders.embeddings / f"{context.embedding_name}-{step}.{context.config.save_format}"
    if existing.is_file():
        return existing
    embedding = Embedding(
        context.embedding_name,
        detached_copy(vectors),
        step,
        context.backend.model_hash,
        context.backend.model_name,
    )
    return outputs.save_step_copy(context.folders, embedding, None, {}, context.config.save_format)
