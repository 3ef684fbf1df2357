"""What the Train panel shows while a run goes: progress with ETA, the loss curve, previews, the last copy.

The run's record is the launcher's `RunProgress` (ti_trainer/progress.py), held by a `LiveRun` that the
training job writes from its worker thread; the page polls it once a second. One `LiveRun` per tab: every
browser on the same host sees the same run, as with the WebUI's own jobs. No torch and no Gradio here, so all
of it is checked without a browser.
"""

from __future__ import annotations

import html
from pathlib import Path

from ti_trainer.progress import RunProgress

ACTIVE_PHASES = ("preparing", "training", "stopping")  # javascript/ti_trainer.js polls while in these
MESSAGES_SHOWN = 6


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(run: RunProgress) -> str:
    """The progress box: state, a bar, step, epoch, loss, speed and ETA, the latest messages."""
    phase = run.phase
    done = run.step - run.first_step
    total = max(1, run.end_step - run.first_step)
    percent = 100.0 * done / total if phase != "preparing" else 0.0
    headline = {
        "idle": "No training running.",
        "queued": f"Queued: {run.embedding_name} starts when the job before it ends.",
        "preparing": f"Preparing {run.embedding_name}: checking the settings and encoding the images…",
        "training": f"Training {run.embedding_name}",
        "stopping": f"Interrupt: {run.embedding_name} stops after this step and saves…",
    }.get(phase, run.summary)
    parts = [f'<div class="ti-trainer-progress" data-state="{phase}" data-version="{run.version}">']
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
            "loss —" if run.loss is None else f"loss {run.loss:.4f}",
            f"learning rate {run.learn_rate or 0:g}",
            f"{run.seconds_per_step:.2f} s/step",
        ]
        if phase in ACTIVE_PHASES:
            facts.append(f"ETA {format_duration(run.eta_seconds)}")
        parts.append(f'<p class="ti-trainer-facts">{html.escape(" · ".join(facts))}</p>')
    if run.last_saved:
        saved = Path(run.last_saved)
        parts.append(
            f'<p class="ti-trainer-saved">Last saved copy: <code>{html.escape(saved.name)}</code> '
            f"in {html.escape(str(saved.parent))}</p>"
        )
    if run.messages:
        items = "".join(f"<li>{html.escape(text)}</li>" for text in run.messages[-MESSAGES_SHOWN:])
        parts.append(f'<ul class="ti-trainer-messages">{items}</ul>')
    parts.append("</div>")
    return "".join(parts)


def loss_rows(run: RunProgress) -> list[dict]:
    """Rows for the loss plot: the training loss of every step, and the validation loss where measured."""
    rows = [{"step": step, "loss": loss, "curve": "training loss"} for step, loss in run.losses]
    rows += [{"step": step, "loss": loss, "curve": "validation loss"} for step, loss in run.validation]
    return rows
