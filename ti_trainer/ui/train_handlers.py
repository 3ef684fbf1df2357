"""The Train panel's handlers: plain functions of the host services, the LiveRun and the field values.

The panel (train_panel.py) wires them to its components; tests call them directly. While a run goes the page
clicks a hidden Poll button once a second (javascript/ti_trainer.js) and `poll` reads the LiveRun; inside the
WebUI the job also reports to the WebUI's own progress bar through `services.job_progress`.
"""

from __future__ import annotations

import html
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.progress import LiveRun, RunProgress
from ti_trainer.training import batch_plan
from ti_trainer.training.schedule import parse_schedule
from ti_trainer.training.settings_history import latest_settings
from ti_trainer.ui.common import embedding_names, note, notes, template_names
from ti_trainer.ui.live_run import loss_rows, progress_html
from ti_trainer.ui.train_form import config_from_form, form_values

if TYPE_CHECKING:
    from ti_trainer.host.base import HostServices

# Offered everywhere; inside the WebUI any of its sampler names can be typed in.
PREVIEW_SAMPLERS = ["Euler a", "Euler", "DDIM", "DPM++ 2M"]
DEFAULT_MAX_BATCH = 4
MAX_SPLITS_SHOWN = 6  # largest batches first: the fastest even splits


# ---- the planner ---------------------------------------------------------------------------------------


def plan_view(data_dir: str, batch, accumulation, max_steps, save_every, preview_every, max_batch):
    """(plan as HTML, even splits as Dataset samples) for the chosen folder and numbers."""
    images = batch_plan.count_images(data_dir)
    if not images:
        text = "Choose a dataset folder to see how batch size and accumulation split it into steps."
        if data_dir and images is None:
            text = f"{data_dir} is not a folder."
        elif data_dir:
            text = f"{data_dir} holds no images."
        return note("info", text), gr.update(samples=[], visible=False)
    the_plan = batch_plan.plan(images, int(batch or 1), int(accumulation or 1))
    lines = batch_plan.explain(the_plan, int(max_steps or 0), int(save_every or 0), int(preview_every or 0))
    combos = batch_plan.even_combinations(images, max(1, int(max_batch or 1)))[:MAX_SPLITS_SHOWN]
    samples = [[c.batch_size, c.gradient_accumulation, c.steps_per_epoch] for c in combos]
    body = "".join(f"<p>{_markdown_bold(line)}</p>" for line in lines)
    return f'<div class="ti-trainer-plan">{body}</div>', gr.update(samples=samples, visible=bool(samples))


def _markdown_bold(line: str) -> str:
    parts = html.escape(line).split("**")
    return "".join(f"<strong>{part}</strong>" if i % 2 else part for i, part in enumerate(parts))


def plan_with_splits(data_dir: str, batch, accumulation, max_steps, save_every, preview_every, max_batch):
    """`plan_view`, and the splits it shows once more for the page's State (what `use_combination` reads)."""
    html_text, splits = plan_view(
        data_dir, batch, accumulation, max_steps, save_every, preview_every, max_batch
    )
    return html_text, splits, splits["samples"]


def use_combination(index: int, shown: list[list[int]]) -> tuple[int, int]:
    """A click on an even split, by its row: (batch size, gradient accumulation).

    The rows come from the page's State, not from the Dataset: Gradio 3.41 looks a clicked sample up in the
    samples the Dataset was built with (none before a folder is chosen), not in those an update showed.
    """
    batch, accumulation, _ = shown[int(index)]
    return int(batch), int(accumulation)


def align_to_epochs(data_dir: str, batch, accumulation, max_steps, save_every, preview_every):
    """Round max steps and both save intervals to whole epochs (unchanged where there are no images)."""
    images = batch_plan.count_images(data_dir)
    if not images:
        return max_steps, save_every, preview_every
    per_epoch = batch_plan.plan(images, int(batch or 1), int(accumulation or 1)).steps_per_epoch
    return tuple(
        batch_plan.nearest_aligned(int(value), per_epoch) if int(value or 0) > 0 else 0
        for value in (max_steps, save_every, preview_every)
    )


# ---- the embedding, resume ------------------------------------------------------------------------------


def embedding_status(services: HostServices, name: str, max_steps) -> str:
    """What training `name` will do: its vectors, the step it is at, and whether it resumes exactly."""
    if not name:
        return note("info", "Pick the embedding to train (create one on the Create embedding tab).")
    from ti_trainer.embeddings.create import existing_embedding_file
    from ti_trainer.embeddings.files import load_embedding, optimizer_state_path

    path = existing_embedding_file(services.embeddings_dir, name)
    if path is None:
        return note("error", f"No embedding named {name} in {services.embeddings_dir}. Refresh the list.")
    try:
        embedding = load_embedding(path)
    except UserError as error:
        return note("error", str(error))
    items = [("info", f"{path.name}: {embedding.num_vectors} vector(s) of width {embedding.width}.")]
    if embedding.step == 0:
        items.append(("ok", "Not trained yet: training starts at step 1."))
    elif embedding.step >= int(max_steps or 0):
        items.append(
            ("warn", f"Already trained {embedding.step} steps: raise Max steps above that to train further.")
        )
    elif optimizer_state_path(path).is_file():
        items.append(
            ("ok", f"Trained {embedding.step} steps: training resumes from there, with its optimizer state.")
        )
    else:
        items.append(
            (
                "warn",
                f"Trained {embedding.step} steps: training resumes from there, but without optimizer state "
                "(no .optim file), so the first steps may wander.",
            )
        )
    return notes(items)


def fill_from_last_run(services: HostServices, names: list[str], embedding_name: str, log_dir: str):
    """The form as the last run of this embedding left it (from its settings JSON), plus a message."""
    settings = latest_settings(log_dir or services.log_dir, embedding_name)
    if settings is None:
        unchanged = [gr.update() for _ in names]
        return [*unchanged, note("warn", f"No earlier run of {embedding_name or '(none)'} in {log_dir}.")]
    try:
        config = TrainConfig.from_settings_file(settings)
    except UserError as error:
        return [*[gr.update() for _ in names], note("error", str(error))]
    config.embedding_name = embedding_name
    values = form_values(config, names)
    return [*values, note("ok", f"Settings read from {settings}.")]


def learn_rate_status(learn_rate: str, max_steps) -> str:
    """Check the learning-rate schedule as it is typed, before any training starts."""
    try:
        schedule = parse_schedule(learn_rate, max(1, int(max_steps or 1)))
    except UserError as error:
        return note("error", str(error))
    if len(schedule.pieces) == 1:
        return ""
    pieces = ", ".join(f"{value:g} until step {end}" for value, end in schedule.pieces)
    return note("info", pieces)


def refresh_lists(services: HostServices, embedding: str, template: str):
    services.refresh_embeddings()
    embeddings, templates = embedding_names(services), template_names(services)
    return (
        gr.update(choices=embeddings, value=embedding if embedding in embeddings else None),
        gr.update(choices=templates, value=template if template in templates else None),
    )


# ---- the run ----------------------------------------------------------------------------------------------


def memory_estimate_view(services: HostServices, names: list[str], *values):
    """The "Estimate GPU memory" button: (note HTML, the planner's "most images your GPU fits" number) for
    the form's settings on the host's model, from the VRAM estimate (no GPU used; a few seconds)."""
    from ti_trainer.vram.estimate import DEFAULT_BUDGET_GIB, GIB
    from ti_trainer.vram.for_config import estimate_for_config, largest_batch_for_config, summary

    try:
        config = config_from_form(services, names, list(values))
        backend = services.get_backend()
        estimate = estimate_for_config(config, backend)
        most = largest_batch_for_config(config, backend)
    except UserError as error:
        return note("error", str(error)), gr.update()
    text = summary(estimate, DEFAULT_BUDGET_GIB) + "."
    if most:
        text += f" The most that fits at this size: batch {most}."
    else:
        text += " Not even batch 1 fits: lower the size, or see `python -m ti_trainer estimate`."
    kind = "ok" if estimate.fits(int(DEFAULT_BUDGET_GIB * GIB)) else "warn"
    return note(kind, text), (most or gr.update())


def run_training_job(services: HostServices, live: LiveRun, names: list[str], id_task: str, *values):
    """The Train button. `id_task` is the WebUI's job id (its progress bar follows it); unused here.

    Returns (result HTML, extra HTML) like the WebUI's own Train tab, so `wrap_gradio_gpu_call(fn,
    extra_outputs=[gr.update()])` can wrap it unchanged. It never raises: the artist gets the message, once.
    A form that cannot be read is this page's business: its message is the result, and the run on show (which
    every page sees) is left alone. Once a run has begun, the progress box shows its failure, and the result
    stays empty rather than repeat it.
    """
    try:
        config = config_from_form(services, names, list(values))
    except UserError as error:
        return note("error", str(error)), ""
    try:
        result = services.train(config, live)  # records its own failure in `live`: the progress box shows it
    except UserError:
        return "", ""
    except Exception:
        traceback.print_exc()
        return "", ""
    return note("ok", f"{result.summary}. Copies, previews and logs: {result.log_folder}"), ""


def request_interrupt(services: HostServices, live: LiveRun) -> str:
    services.request_interrupt()
    live.stopping()
    return progress_html(live.snapshot())


def poll(live: LiveRun, seen_version):
    """(progress, loss plot, previews, last saved copy, version): the heavy parts only when they changed."""
    run = live.snapshot()
    if seen_version is not None and int(seen_version) == run.version:
        return progress_html(run), gr.update(), gr.update(), gr.update(), run.version
    frame, previews, saved = loss_frame(run), preview_items(run), saved_file(run)
    return (
        progress_html(run),
        gr.update(value=None if frame.empty else frame, visible=not frame.empty),
        gr.update(value=previews, visible=bool(previews)),
        gr.update(value=saved, visible=saved is not None),
        run.version,
    )


def open_page(
    services: HostServices, live: LiveRun, names: list[str], embedding: str, template: str, max_steps
) -> list:
    """What a page shows when it opens (the Blocks' load event): fresh lists, and the run on show with the form
    it was started with, so a finished or running panel never sits beside a form of other settings.

    Returns updates for: every form field (`names` order), the embedding status, then `poll`'s outputs.
    With no run since the host started, the form keeps its values and only the lists are refreshed.
    """
    run = live.snapshot()
    if run.settings is not None:
        values = form_values(TrainConfig.from_dict(run.settings), names)
        form = dict(zip(names, values))
        embedding, template, max_steps = form["embedding_name"], form["template"], form["max_steps"]
    else:
        form = {name: gr.update() for name in names}
    form["embedding_name"], form["template"] = refresh_lists(services, embedding, template)
    status = embedding_status(services, form["embedding_name"]["value"], max_steps)
    return [*(form[name] for name in names), status, *poll(live, None)]


def loss_frame(run: RunProgress) -> pd.DataFrame:
    return pd.DataFrame(loss_rows(run), columns=["step", "loss", "curve"])


def preview_items(run: RunProgress) -> list[tuple[str, str]]:
    return [(path, Path(path).stem) for path in reversed(run.previews) if Path(path).is_file()]


def saved_file(run: RunProgress) -> str | None:
    path = run.last_saved
    return path if path is not None and Path(path).is_file() else None
