"""One record of a run's progress, `RunProgress`, which the panel, the API and the CLI all read.

The launcher (launch.py) writes it from the thread that trains, through a `LiveRun`; readers take copies
with `snapshot()` from any thread. The API returns the record as JSON, so its values stay JSON-ready (paths as
text, no NaN) and its field names are a public interface: add fields, never rename them. No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# `status` values, as the API has always reported them; "idle" is a panel before its first run.
DONE_STATUSES = ("finished", "interrupted", "failed")
KEEP_MESSAGES = 50


@dataclass
class RunProgress:
    id: str = ""  # the API job's id; empty for the panel's and the CLI's runs
    status: str = "idle"  # idle | queued | running | finished | interrupted | failed
    embedding_name: str = ""
    stop_requested: bool = False  # Interrupt was asked for: the run stops and saves after this step
    step: int = 0
    first_step: int = 0  # the step the run started from (not 0 when it resumes)
    end_step: int = 0
    epoch: int = 0
    loss: float | None = None  # None until a step reports a finite loss
    learn_rate: float | None = None
    seconds_per_step: float = 0.0
    eta_seconds: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, loss on the fixed batch)
    previews: list[str] = field(default_factory=list)
    last_saved: str | None = None
    last_preview: str | None = None
    messages: list[str] = field(default_factory=list)
    summary: str = ""
    error: str | None = None
    stopped_early: bool = False  # the validation loss levelled off and early stopping ended the run
    embedding_path: str | None = None
    log_folder: str | None = None
    # The run's TrainConfig as a dict, so a page opened later shows the form this run was started with.
    settings: dict | None = None
    version: int = 0  # goes up with every change, so a poll can skip what it has already seen

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES

    @property
    def phase(self) -> str:
        """What the run is doing, in the panel's words: the status, with a running run split into
        preparing (no step yet), training and stopping."""
        if self.status != "running":
            return self.status
        if self.stop_requested:
            return "stopping"
        return "training" if self.step else "preparing"


class LiveRun:
    """The progress record of the run in progress, behind a lock: written by the launcher, read by anyone."""

    def __init__(self, job_id: str = "", clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._run = RunProgress(id=job_id)
        self._timing: tuple[float, int] | None = None  # (clock at the first step's end, that step)

    def snapshot(self) -> RunProgress:
        """A copy that the writer will not change under the reader."""
        with self._lock:
            run = self._run
            return dataclasses.replace(
                run,
                losses=list(run.losses),
                validation=list(run.validation),
                previews=list(run.previews),
                messages=list(run.messages),
                settings=None if run.settings is None else dict(run.settings),
            )

    def _change(self, **values) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self._run, key, value)
            self._run.version += 1

    def queue(self) -> None:
        self._change(status="queued")

    def begin(self, embedding_name: str, end_step: int, settings: dict | None = None) -> None:
        """A new run starts: everything of the previous one is cleared, except the job's id."""
        with self._lock:
            previous = self._run
            self._run = RunProgress(
                id=previous.id,
                status="running",
                embedding_name=embedding_name,
                end_step=end_step,
                settings=settings,
                version=previous.version + 1,
            )
            self._timing = None

    def message(self, text: str) -> None:
        with self._lock:
            self._run.messages = [*self._run.messages, text][-KEEP_MESSAGES:]
            self._run.version += 1

    def on_step(self, report) -> None:
        """`report` is the training loop's StepReport."""
        now = self._clock()
        with self._lock:
            run = self._run
            if self._timing is None:
                self._timing = (now, report.step)
                run.first_step = report.step - 1
                run.seconds_per_step = report.seconds
            else:
                started, first = self._timing
                # Wall time per step, so saves, previews and validation count towards the estimate.
                run.seconds_per_step = (now - started) / max(1, report.step - first)
            run.step, run.end_step, run.epoch = report.step, report.end_step, report.epoch
            run.learn_rate = report.learn_rate
            # A skipped step's loss is NaN or inf: JSON cannot carry it and a plot cannot draw it.
            if not report.skipped and math.isfinite(report.loss):
                run.loss = report.loss
                run.losses = [*run.losses, (report.step, report.loss)]
            run.eta_seconds = run.seconds_per_step * max(0, report.end_step - report.step)
            run.version += 1

    def validation_point(self, step: int, loss: float) -> None:
        if math.isfinite(loss):
            with self._lock:
                self._run.validation = [*self._run.validation, (step, loss)]
                self._run.version += 1

    def saved(self, path: Path) -> None:
        self._change(last_saved=str(path))

    def previewed(self, path: Path) -> None:
        with self._lock:
            self._run.previews = [*self._run.previews, str(path)]
            self._run.last_preview = str(path)
            self._run.version += 1

    def stopping(self) -> None:
        with self._lock:
            if not self._run.done:
                self._run.stop_requested = True
                self._run.version += 1

    def finish(self, result) -> None:
        """`result` is the training loop's TrainResult."""
        how = (
            "interrupted"
            if result.interrupted
            else "stopped early"
            if result.stopped_by_monitor
            else "finished"
        )
        self._change(
            status="interrupted" if result.interrupted else "finished",
            step=result.steps_done,
            summary=f"Training {how} at step {result.steps_done}.",
            stopped_early=result.stopped_by_monitor,
            embedding_path=str(result.embedding_path),
            log_folder=str(result.log_folder),
            eta_seconds=None,
        )
        self.message(result.summary)

    def cancel(self) -> None:
        """Interrupted before it started (a queued job)."""
        self._change(status="interrupted", summary="Interrupted before training started.", eta_seconds=None)

    def fail(self, text: str) -> None:
        self._change(status="failed", error=text, summary=text, eta_seconds=None)
