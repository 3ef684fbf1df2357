"""The "Results" panel: pick a run, see its curves and warnings, compare its steps, use the winner.

Gradio is imported only inside `build_results_panel`, and only calls that Gradio 3.41 (A1111's) and 4.40
(Forge's) both take are made (ui/compat.py where they differ). Every handler is a plain module-level function over plain values, so it is tested
without a browser; updates are returned as Gradio's update dictionaries. The work itself is done by
ti_trainer.analysis: this module holds no analysis.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.ui.common import REFRESH_LABEL, PageLoad, note, notes
from ti_trainer.ui.compat import update as _update

TABLE_HEADERS = ["image", "caption", "validation loss", "gradient share %", "note"]
NO_RUN = "Pick a run: the runs under the log directory are listed, newest first."


def _table(rows: list[list]) -> dict:
    # Headers with the data: a Gradio 3 Dataframe keeps its columns even when there are no rows.
    return {"headers": TABLE_HEADERS, "data": rows or [["", "", "", "", ""]]}


def _error(error: Exception) -> str:
    if isinstance(error, UserError):
        return note("error", str(error))
    return note("error", f"Unexpected error ({type(error).__name__}): {error}")


# --- finding runs ------------------------------------------------------------------------------------------


def run_labels(log_dir: str) -> list[str]:
    """Runs under `log_dir` as `<date>/<name>`, most recently trained first."""
    from ti_trainer.analysis.run_files import find_runs

    root = Path((log_dir or "").strip()).expanduser()
    return [run.relative_to(root).as_posix() for run in find_runs(root)]


def list_runs(log_dir: str, current: str | None = None) -> dict:
    labels = run_labels(log_dir)
    return _update(choices=labels, value=current if current in labels else (labels[0] if labels else None))


def open_page(log_dir: str, current: str | None) -> list:
    """When a page opens: the runs as they are now (the panel was built when the host started), and the
    chosen one shown afresh. Returns the run list's update, then `show_run`'s outputs."""
    runs = list_runs(log_dir, current)
    return [runs, *show_run(log_dir, runs["value"])]


def open_run(log_dir: str, label: str | None):
    """The RunInfo for a label from `run_labels`, refusing anything outside the log directory."""
    from ti_trainer.analysis.run_files import RunInfo

    if not label:
        raise UserError(NO_RUN)
    root = Path((log_dir or "").strip()).expanduser().resolve()
    folder = (root / label).resolve()
    if os.path.commonpath([root, folder]) != str(root):
        raise UserError(f"{label!r} is not a run inside {root}.")
    return RunInfo.open(folder)


# --- showing a run -----------------------------------------------------------------------------------------


@dataclass
class RunView:
    """Everything the panel shows for one run, in the order of `show_run`'s outputs."""

    summary: str
    loss_chart: object  # PIL images, or None
    norm_chart: object
    table: dict
    table_note: str
    steps: dict  # CheckboxGroup update: the saved steps, all ticked
    report_step: dict  # Dropdown update
    use_step: dict  # Dropdown update: the suggested step preselected
    prompts: str
    negative_prompt: str
    seeds: str
    width: int
    height: int
    sampler_steps: int
    cfg_scale: float
    new_name: str

    def outputs(self) -> list:
        return [getattr(self, name) for name in self.__dataclass_fields__]


def show_run(log_dir: str, label: str | None) -> list:
    """Summary, both charts, the per-image table, the steps and this run's comparison settings."""
    from ti_trainer.analysis import compare, results

    try:
        run = open_run(log_dir, label)
        analysis = results.analyse(run)
        settings = compare.load_settings(run)
    except Exception as error:
        return _empty_view(_error(error) if label else note("info", NO_RUN)).outputs()
    kinds = [
        ("warn" if line.startswith("Overbake") or "pull(s)" in line else "info", line)
        for line in results.summary_lines(analysis)
    ]
    steps = [str(step) for step in run.saved_steps()]
    table_step, rows = results.image_table(run)
    suggested = analysis.nearest_saved_step
    use_default = str(suggested) if suggested is not None else (steps[-1] if steps else None)
    return RunView(
        summary=notes(kinds),
        loss_chart=results.loss_chart(analysis),
        norm_chart=results.norm_chart(analysis),
        table=_table(rows),
        table_note=_table_note(table_step, rows),
        steps=_update(choices=steps, value=steps),
        report_step=_update(choices=steps, value=steps[-1] if steps else None),
        use_step=_update(choices=steps, value=use_default),
        prompts="\n".join(settings.prompts),
        negative_prompt=settings.negative_prompt,
        seeds=", ".join(str(seed) for seed in settings.seeds),
        width=settings.width,
        height=settings.height,
        sampler_steps=settings.sampler_steps,
        cfg_scale=settings.cfg_scale,
        new_name=f"{run.name}-{use_default}" if use_default else run.name,
    ).outputs()


def _empty_view(summary: str) -> RunView:
    from ti_trainer.analysis.compare import CompareSettings

    defaults = CompareSettings()
    return RunView(
        summary,
        None,
        None,
        _table([]),
        "",
        _update(choices=[], value=[]),
        _update(choices=[], value=None),
        _update(choices=[], value=None),
        "\n".join(defaults.prompts),
        defaults.negative_prompt,
        "1",
        512,
        512,
        defaults.sampler_steps,
        defaults.cfg_scale,
        "",
    )


def _table_note(step: int | None, rows: list[list]) -> str:
    if step is None:
        return note(
            "info",
            "No per-image report yet: a run with validation on writes one early and at its end.",
        )
    text = (
        f"At step {step}. Loss: how badly the embedding fits the image (at batch 1, averaged over its latest "
        "training passes; otherwise at fixed noise and timesteps). "
        "Gradient share: how hard the image pulls on the embedding; an even set gives each "
        f"{100 / max(1, len(rows)):.0f}%."
    )
    return note("info", text)


# --- per-image report at a chosen step ---------------------------------------------------------------------


def measure_images(services: HostServices, log_dir: str, label: str | None, step: str | None) -> list:
    """Measure every image's loss and gradient share at a saved step, with the host's model (slow-ish)."""
    from ti_trainer.analysis import results
    from ti_trainer.analysis.image_report import report_for_step

    try:
        run = open_run(log_dir, label)
        if not step:
            raise UserError("Pick the saved step to measure.")
        report_for_step(run, services.get_backend(), int(step))
        chosen, rows = results.image_table(run, int(step))
    except Exception as error:
        return [_update(), _error(error)]
    return [_table(rows), _table_note(chosen, rows)]


# --- comparison grid ---------------------------------------------------------------------------------------


def render_comparison(
    services: HostServices,
    log_dir: str,
    label: str | None,
    steps: list[str] | None,
    prompts: str,
    negative_prompt: str,
    seeds: str,
    width: float,
    height: float,
    sampler_steps: float,
    cfg_scale: float,
    on_progress=lambda done, total: None,
) -> list:
    """Render the grid (rows = the ticked steps, columns = prompts x seeds); returns [image, message]."""
    from ti_trainer.analysis import compare

    try:
        run = open_run(log_dir, label)
        settings = compare.CompareSettings(
            prompts=[line.strip() for line in (prompts or "").splitlines() if line.strip()],
            negative_prompt=negative_prompt or "",
            seeds=compare.parse_seeds(seeds),
            width=int(width or 0),
            height=int(height or 0),
            sampler_steps=int(sampler_steps),
            cfg_scale=float(cfg_scale),
        )
        settings.check()
        chosen = sorted(int(step) for step in (steps or []))
        if not chosen:
            raise UserError("Tick at least one step to compare.")

        def progress(done: int, total: int) -> None:
            on_progress(done, total)
            services.job_progress(done, total, f"Comparison grid: image {done} of {total}")

        grid = compare.render_grid(
            run,
            settings,
            compare.renderer_for(services, run),
            chosen,
            on_progress=progress,
            should_stop=services.interrupt_requested,
            family=services.get_backend().family,
        )
    except Exception as error:
        return [None, _error(error)]
    messages = [("ok", f"Saved {grid.path} ({len(grid.steps)} steps x {len(grid.column_labels)} columns).")]
    messages += [("warn", text) for text in grid.notes]
    return [grid.image, notes(messages)]


# --- use this step -----------------------------------------------------------------------------------------


def use_selected_step(
    services: HostServices, log_dir: str, label: str | None, step: str | None, name: str, overwrite: bool
) -> str:
    from ti_trainer.analysis.use_step import use_step

    try:
        run = open_run(log_dir, label)
        if not step:
            raise UserError("Pick the step to use.")
        path = use_step(
            run, int(step), name, services.embeddings_dir, bool(overwrite), services.refresh_embeddings
        )
    except Exception as error:
        return _error(error)
    return note(
        "ok", f"Saved {path.name} in {path.parent}: write {path.stem!r} in a prompt to use step {step}."
    )


# --- the panel ---------------------------------------------------------------------------------------------


def build_results_panel(services: HostServices) -> PageLoad:
    """Create the panel's components inside the caller's current gr.Blocks / gr.Tab context.

    The newest run is shown from the start (read at build time: a few small files); Refresh re-reads, and so
    does every page when it opens (the returned PageLoad, wired by the tab to its `load` event).
    """
    import gradio as gr

    labels = run_labels(str(services.log_dir))
    first = RunView(*show_run(str(services.log_dir), labels[0] if labels else None))
    with gr.Row():
        log_dir = gr.Textbox(value=str(services.log_dir), label="Log directory", scale=3)
        run = gr.Dropdown(
            choices=labels,
            value=labels[0] if labels else None,
            label="Run (date/name)",
            scale=3,
            elem_id="ti_trainer_results_run",
        )
        refresh = gr.Button(REFRESH_LABEL, scale=1, elem_id="ti_trainer_results_refresh")
    summary = gr.HTML(first.summary)
    with gr.Row():
        # No Gradio label: it would sit over the chart's own title (the label stays for screen readers).
        loss_chart = gr.Image(
            value=first.loss_chart,
            label="Training and validation loss",
            show_label=False,
            type="pil",
            interactive=False,
        )
        norm_chart = gr.Image(
            value=first.norm_chart,
            label="Vector lengths (overbake signal)",
            show_label=False,
            type="pil",
            interactive=False,
        )

    with gr.Accordion("Which image dominates", open=True):
        table = gr.Dataframe(value=first.table, headers=TABLE_HEADERS, interactive=False, wrap=True)
        table_note = gr.HTML(first.table_note)
        with gr.Row():
            report_step = gr.Dropdown(label="Saved step", scale=2, **_choices(first.report_step))
            measure = gr.Button("Measure the images at this step", scale=1)

    with gr.Accordion("Compare steps", open=True):
        steps = gr.CheckboxGroup(label="Steps (rows of the grid)", **_choices(first.steps))
        prompts = gr.Textbox(
            value=first.prompts,
            lines=6,
            label="Prompts (columns), one per line; [name] is where the embedding goes",
        )
        negative = gr.Textbox(value=first.negative_prompt, label="Negative prompt")
        with gr.Row():
            seeds = gr.Textbox(value=first.seeds, label="Seeds (each adds a column per prompt)")
            width = gr.Number(value=first.width, precision=0, label="Width")
            height = gr.Number(value=first.height, precision=0, label="Height")
            sampler_steps = gr.Slider(1, 150, value=first.sampler_steps, step=1, label="Sampling steps")
            cfg = gr.Slider(1.0, 30.0, value=first.cfg_scale, step=0.5, label="CFG scale")
        render = gr.Button("Render comparison grid", variant="primary")
        grid = gr.Image(
            label="Comparison grid (saved in the run's compare/ folder)", type="pil", interactive=False
        )
        grid_message = gr.HTML()

    with gr.Accordion("Use this step", open=True):
        with gr.Row():
            use_step = gr.Dropdown(label="Step", scale=1, **_choices(first.use_step))
            new_name = gr.Textbox(value=first.new_name, label="Name to write in prompts", scale=2)
            overwrite = gr.Checkbox(value=False, label="Replace an embedding of that name")
        use = gr.Button("Put this step in the embeddings folder")
        use_message = gr.HTML()

    view = [
        summary,
        loss_chart,
        norm_chart,
        table,
        table_note,
        steps,
        report_step,
        use_step,
        prompts,
        negative,
        seeds,
        width,
        height,
        sampler_steps,
        cfg,
        new_name,
    ]
    refresh.click(list_runs, [log_dir, run], [run]).then(show_run, [log_dir, run], view)
    run.change(show_run, [log_dir, run], view)
    # Long jobs go through the host's queue (A1111: the GPU lock); their last output is the message.
    measure.click(
        services.wrap_job(partial(measure_images, services)), [log_dir, run, report_step], [table, table_note]
    )
    render.click(
        services.wrap_job(partial(render_comparison, services)),
        [log_dir, run, steps, prompts, negative, seeds, width, height, sampler_steps, cfg],
        [grid, grid_message],
    )
    use_step.change(suggest_name, [run, use_step, new_name], [new_name])
    use.click(
        partial(use_selected_step, services), [log_dir, run, use_step, new_name, overwrite], [use_message]
    )
    return PageLoad(open_page, [log_dir, run], [run, *view])


def _choices(update: dict) -> dict:
    """A Dropdown/CheckboxGroup update's choices and value, as constructor arguments."""
    return {"choices": update.get("choices", []), "value": update.get("value")}


def suggest_name(label: str | None, step: str | None, current: str) -> str:
    """Follow the step in the suggested name (`<name>-<step>`) unless the artist typed their own."""
    if not label or not step:
        return current
    base = Path(label).name
    if current and not re.fullmatch(rf"{re.escape(base)}(-\d+)?", current):
        return current
    return f"{base}-{step}"
