"""What the Train panel shows while a run goes: progress with ETA, the loss curve, previews, the last copy.

The training job writes into a `LiveRun` from its worker thread (through the loop's hooks); the page polls it
once a second. One `LiveRun` per tab: every browser on the same host sees the same run, as with the WebUI's
own jobs. No torch and no Gradio here, so all of it is checked without a browser.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ACTIVE_STATES = ("preparing", "training", "stopping")
MAX_MESSAGES = 6


@dataclass
class RunSnapshot:
    state: str = "idle"  # idle | preparing | training | stopping | finished | failed
    embedding_name: str = ""
    step: int = 0
    first_step: int = 0  # the step the run started from (not 0 when it resumes)
    end_step: int = 0
    epoch: int = 0
    loss: float = float("nan")
    learn_rate: float = 0.0
    seconds_per_step: float = 0.0
    eta_seconds: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    last_saved: Path | None = None
    messages: list[str] = field(default_factory=list)
    summary: str = ""
    # The run's TrainConfig as a dict, so a page opened later shows the form this run was started with.
    settings: dict | None = None
    version: int = 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


class LiveRun:
    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._run = RunSnapshot()
        self._timing: tuple[float, int] | None = None  # (clock at the first step's end, that step)
        self._validation_source = None

    def _change(self, **values) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self._run, key, value)
            self._run.version += 1

    def begin(self, embedding_name: str, end_step: int, settings: dict | None = None) -> None:
        with self._lock:
            self._run = RunSnapshot(
                state="preparing",
                embedding_name=embedding_name,
                end_step=end_step,
                settings=settings,
                version=self._run.version + 1,
            )
            self._timing = None
            self._validation_source = None

    def watch_validation(self, monitor) -> None:
        """A monitor with `steps` and `losses` lists (the validation loss on a fixed batch) to plot."""
        self._validation_source = monitor

    def message(self, text: str) -> None:
        with self._lock:
            self._run.messages = [*self._run.messages, text][-MAX_MESSAGES:]
            self._run.version += 1

    def on_step(self, report) -> None:
        """`report` is the loop's StepReport."""
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
            run.state = "stopping" if run.state == "stopping" else "training"
            run.step, run.end_step, run.epoch = report.step, report.end_step, report.epoch
            run.loss, run.learn_rate = report.loss, report.learn_rate
            run.eta_seconds = run.seconds_per_step * max(0, report.end_step - report.step)
            if not report.skipped:
                run.losses = [*run.losses, (report.step, report.loss)]
            run.version += 1

    def on_saved(self, path: Path) -> None:
        self._change(last_saved=Path(path))

    def on_preview(self, path: Path) -> None:
        with self._lock:
            self._run.previews = [*self._run.previews, Path(path)]
            self._run.version += 1

    def stopping(self) -> None:
        with self._lock:
            if self._run.active:
                self._run.state = "stopping"
                self._run.version += 1

    def finish(self, summary: str) -> None:
        self._change(state="finished", summary=summary, eta_seconds=None)

    def fail(self, text: str) -> None:
        self._change(state="failed", summary=text, eta_seconds=None)

    def snapshot(self) -> RunSnapshot:
        with self._lock:
            run = RunSnapshot(**{**self._run.__dict__})
        source = self._validation_source
        if source is not None:
            steps, losses = list(source.steps), list(source.losses)
            run.validation = list(zip(steps, losses))
        return run


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(run: RunSnapshot) -> str:
    """The progress box: state, a bar, step, epoch, loss, speed and ETA, the latest messages."""
    done = run.step - run.first_step
    total = max(1, run.end_step - run.first_step)
    percent = 100.0 * done / total if run.state != "preparing" else 0.0
    headline = {
        "idle": "No training running.",
        "preparing": f"Preparing {run.embedding_name}: checking the settings and encoding the images…",
        "training": f"Training {run.embedding_name}",
        "stopping": f"Interrupt: {run.embedding_name} stops after this step and saves…",
        "finished": run.summary,
        "failed": run.summary,
    }[run.state]
    parts = [f'<div class="ti-trainer-progress" data-state="{run.state}" data-version="{run.version}">']
    # A failed run's message is shown here only (style.css colours it); the Train button's result stays empty.
    parts.append(f'<p class="ti-trainer-headline">{html.escape(headline)}</p>')
    if run.step:
        parts.append(
            f'<div class="ti-trainer-bar" role="progressbar" aria-valuenow="{percent:.0f}" '
            f'aria-valuemin="0" aria-valuemax="100"><div style="width: {percent:.1f}%"></div></div>'
        )
        facts = [
            f"Step {run.step} / {run.end_step}",
            f"epoch {run.epoch}",  # counted from 0, as in the loss CSV and A1111's (training/outputs.py)
            f"loss {run.loss:.4f}",
            f"learning rate {run.learn_rate:g}",
            f"{run.seconds_per_step:.2f} s/step",
        ]
        if run.active:
            facts.append(f"ETA {format_duration(run.eta_seconds)}")
        parts.append(f'<p class="ti-trainer-facts">{html.escape(" · ".join(facts))}</p>')
    if run.last_saved:
        parts.append(
            f'<p class="ti-trainer-saved">Last saved copy: <code>{html.escape(run.last_saved.name)}</code> '
            f"in {html.escape(str(run.last_saved.parent))}</p>"
        )
    if run.messages:
        items = "".join(f"<li>{html.escape(text)}</li>" for text in run.messages)
        parts.append(f'<ul class="ti-trainer-messages">{items}</ul>')
    parts.append("</div>")
    return "".join(parts)


def loss_rows(run: RunSnapshot) -> list[dict]:
    """Rows for the loss plot: the training loss of every step, and the validation loss where measured."""
    rows = [{"step": step, "loss": loss, "curve": "training loss"} for step, loss in run.losses]
    rows += [{"step": step, "loss": loss, "curve": "validation loss"} for step, loss in run.validation]
    return rows
