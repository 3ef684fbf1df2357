"""Train: every option of A1111's Train tab, the batch planner, resume, and the live view of a run.

`build_train_panel` lays out the components and wires them to the handlers in train_handlers.py. The form is a
TrainConfig (train_form.py): `form` maps each config field to its component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr

from ti_trainer.config import field_info
from ti_trainer.progress import LiveRun
from ti_trainer.ui.common import REFRESH_LABEL, PageLoad, embedding_names, note, template_names
from ti_trainer.ui.compat import js_event, line_plot_look
from ti_trainer.ui.live_run import progress_html
from ti_trainer.ui.train_form import form_fields, form_values, initial_config
from ti_trainer.ui.train_handlers import (
    DEFAULT_MAX_BATCH,
    PREVIEW_SAMPLERS,
    align_to_epochs,
    embedding_status,
    fill_from_last_run,
    learn_rate_status,
    memory_estimate_view,
    open_page,
    plan_view,
    plan_with_splits,
    poll,
    refresh_lists,
    request_interrupt,
    run_training_job,
    use_combination,
)

if TYPE_CHECKING:
    from ti_trainer.host.base import HostServices


@dataclass
class TrainPanel:
    form: dict[str, gr.components.Component]
    embedding: gr.Dropdown
    train_button: gr.Button
    result: gr.HTML
    live: LiveRun
    page_load: PageLoad


def build_train_panel(services: HostServices, live: LiveRun | None = None) -> TrainPanel:
    live = live or LiveRun()
    fields = form_fields()
    v = dict(zip(fields, form_values(initial_config(services), fields)))
    v["embedding_name"] = v["embedding_name"] or None  # no choice yet, rather than a choice of ""
    form: dict[str, gr.components.Component] = {}

    def field(name: str, component, *args, **kwargs):
        """The form's component for TrainConfig field `name`, holding the config's value, with the field's
        label and, where it has a fixed set, its choices (config.py)."""
        info = field_info(name)
        if info.choices:
            kwargs["choices"] = list(info.choices)
        form[name] = component(
            *args, value=v[name], label=info.label, elem_id=f"ti_trainer_train_{name}", **kwargs
        )
        return form[name]

    with gr.Row(equal_height=False):
        with gr.Column(scale=3, elem_id="ti_trainer_train_settings"):
            with gr.Row():
                field("embedding_name", gr.Dropdown, embedding_names(services))
                refresh = gr.Button(
                    REFRESH_LABEL, size="sm", scale=0, min_width=110, elem_id="ti_trainer_train_refresh"
                )
            embedding_info = gr.HTML(
                embedding_status(services, v["embedding_name"], v["max_steps"]),
                elem_id="ti_trainer_train_embedding_status",
            )
            with gr.Row():
                fill = gr.Button(
                    "Load its last run's settings",
                    size="sm",
                    scale=0,
                    min_width=260,
                    elem_id="ti_trainer_train_fill",
                )
            with gr.Row():
                field("learn_rate", gr.Textbox, max_lines=1)
                field("clip_grad_mode", gr.Dropdown)
                field("clip_grad_value", gr.Textbox, max_lines=1)
            learn_rate_info = gr.HTML(elem_id="ti_trainer_train_learn_rate_status")
            with gr.Row():
                field("batch_size", gr.Number, precision=0, minimum=1)
                field("gradient_accumulation", gr.Number, precision=0, minimum=1)
            field(
                "data_dir",
                gr.Textbox,
                placeholder="folder with your images and their .txt captions",
                max_lines=1,
            )
            with gr.Column(variant="panel", elem_id="ti_trainer_planner"):
                plan_html, plan_splits = plan_view(
                    v["data_dir"],
                    v["batch_size"],
                    v["gradient_accumulation"],
                    v["max_steps"],
                    v["save_every"],
                    v["preview_every"],
                    DEFAULT_MAX_BATCH,
                )
                plan_info = gr.HTML(plan_html, elem_id="ti_trainer_plan")
                with gr.Row(elem_id="ti_trainer_memory_estimate_row"):
                    estimate_button = gr.Button(
                        "Estimate GPU memory",
                        size="sm",
                        scale=0,
                        elem_id="ti_trainer_memory_estimate_button",
                    )
                    estimate_info = gr.HTML(
                        note(
                            "info",
                            "How much GPU memory a step needs at these settings, worked out without "
                            "a GPU: press the button (it takes a few seconds).",
                        ),
                        elem_id="ti_trainer_memory_estimate",
                    )
                splits = gr.Dataset(
                    components=["number", "number", "number"],
                    headers=["Batch size", "Accumulation", "Steps per epoch"],
                    samples=plan_splits["samples"],
                    visible=plan_splits["visible"],
                    label="Even splits of this dataset (click one to use it)",
                    type="index",
                    elem_id="ti_trainer_plan_splits",
                )
                shown_splits = gr.State(plan_splits["samples"])
                with gr.Row(elem_id="ti_trainer_plan_tools"):
                    max_batch = gr.Number(
                        DEFAULT_MAX_BATCH,
                        label="Most images your GPU fits at once",
                        precision=0,
                        minimum=1,
                        elem_id="ti_trainer_plan_max_batch",
                    )
                    align = gr.Button(
                        "Line up saves with epochs",
                        size="sm",
                        scale=0,
                        min_width=220,
                        elem_id="ti_trainer_plan_align",
                    )
            field("log_dir", gr.Textbox, max_lines=1)
            with gr.Row():
                field("template", gr.Dropdown, template_names(services))
                refresh_templates = gr.Button(
                    REFRESH_LABEL,
                    size="sm",
                    scale=0,
                    min_width=110,
                    elem_id="ti_trainer_train_refresh_templates",
                )
            with gr.Row():
                field("width", gr.Slider, 64, 2048, step=8)
                field("height", gr.Slider, 64, 2048, step=8)
            with gr.Row():
                field("keep_size", gr.Checkbox)
                field("aspect_buckets", gr.Checkbox)
            field("max_steps", gr.Number, precision=0, minimum=1)
            with gr.Row():
                field("preview_every", gr.Number, precision=0, minimum=0)
                field("save_every", gr.Number, precision=0, minimum=0)
            field("use_alpha_weight", gr.Checkbox)
            field("save_image_with_embedding", gr.Checkbox)
            field("save_format", gr.Radio)
            field("shuffle_tags", gr.Checkbox)
            field("tag_dropout", gr.Slider, 0, 1, step=0.1)
            field("latent_sampling", gr.Radio)
            with gr.Accordion("Previews", open=False, elem_id="ti_trainer_train_previews"):
                field(
                    "preview_prompt",
                    gr.Textbox,
                    placeholder="empty: a caption from the batch, as built by the template",
                    lines=2,
                )
                field("preview_negative_prompt", gr.Textbox, lines=2)
                with gr.Row():
                    field("preview_sampler", gr.Dropdown, PREVIEW_SAMPLERS, allow_custom_value=True)
                    field("preview_steps", gr.Slider, 1, 150, step=1)
                    field("preview_cfg_scale", gr.Slider, 1, 30, step=0.5)
                with gr.Row():
                    field("preview_seed", gr.Number, precision=0)
                    field("preview_width", gr.Slider, 0, 2048, step=8)
                    field("preview_height", gr.Slider, 0, 2048, step=8)
            with gr.Accordion("Memory and speed", open=False, elem_id="ti_trainer_train_memory"):
                field("precision", gr.Radio)
                with gr.Row():
                    field("attention", gr.Radio)
                    field("upcast_attention", gr.Radio)
                field("gradient_checkpointing", gr.Radio)
                field("vae_offload", gr.Checkbox)
                field("lend_text_encoders", gr.Radio)
                gr.HTML(
                    note(
                        "info",
                        "Always on: the model's weights are frozen (only the embedding learns), and the images "
                        "are encoded once before the first step.",
                    ),
                    elem_id="ti_trainer_train_memory_info",
                )
            with gr.Accordion(
                "Stop when it stops improving", open=False, elem_id="ti_trainer_train_stopping"
            ):
                with gr.Row():
                    field("validate_every", gr.Number, precision=0, minimum=0)
                    field("early_stopping", gr.Checkbox)
                with gr.Row():
                    field("early_stop_window", gr.Number, precision=0, minimum=1)
                    field("early_stop_threshold", gr.Number)
            with gr.Accordion("Captions and logging", open=False, elem_id="ti_trainer_train_more"):
                with gr.Row():
                    field("filename_regex", gr.Textbox, max_lines=1)
                    field("filename_join", gr.Textbox, max_lines=1)
                with gr.Row():
                    field("write_csv_every", gr.Number, precision=0, minimum=0)
                    field("save_optimizer_state", gr.Checkbox)
                with gr.Row():
                    field("seed", gr.Number, precision=0)
                    field("weight_decay", gr.Number)
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="ti_trainer_train_interrupt")
                train_button = gr.Button(
                    "Train Embedding", variant="primary", elem_id="ti_trainer_train_button"
                )
        with gr.Column(scale=2, elem_id="ti_trainer_train_output"):
            progress = gr.HTML(progress_html(live.snapshot()), elem_id="ti_trainer_progress")
            result = gr.HTML(elem_id="ti_trainer_train_result")
            extra = gr.HTML(elem_id="ti_trainer_train_extra")
            loss_plot = gr.LinePlot(
                x="step",
                y="loss",
                color="curve",
                title="Loss",
                visible=False,
                label="Loss",
                show_label=False,
                elem_id="ti_trainer_loss_plot",
                **line_plot_look(legend_title=" ", tooltip=["step", "loss", "curve"], width=360, height=200),
            )
            gallery = gr.Gallery(
                label="Previews",
                columns=3,
                height="auto",
                object_fit="contain",
                elem_id="ti_trainer_previews",
            )
            saved = gr.File(label="Last saved copy", interactive=False, elem_id="ti_trainer_last_saved")
            id_task = gr.Textbox(visible=False, elem_id="ti_trainer_task_id")
            poll_button = gr.Button(visible=False, elem_id="ti_trainer_poll")
            seen = gr.State(None)

    names = list(form)  # every TrainConfig field the artist chooses; a test holds form_fields() to it

    plan_inputs = [
        form["data_dir"],
        form["batch_size"],
        form["gradient_accumulation"],
        form["max_steps"],
        form["save_every"],
        form["preview_every"],
        max_batch,
    ]
    for source in plan_inputs:
        source.change(plan_with_splits, plan_inputs, [plan_info, splits, shown_splits], queue=False)
    splits.click(
        use_combination,
        [splits, shown_splits],
        [form["batch_size"], form["gradient_accumulation"]],
        queue=False,
    )
    estimate_button.click(
        lambda *values: memory_estimate_view(services, names, *values),
        [form[name] for name in names],
        [estimate_info, max_batch],
    )
    align.click(
        align_to_epochs,
        plan_inputs[:-1],
        [form["max_steps"], form["save_every"], form["preview_every"]],
        queue=False,
    )
    for source in (form["learn_rate"], form["max_steps"]):
        source.change(
            learn_rate_status, [form["learn_rate"], form["max_steps"]], [learn_rate_info], queue=False
        )
    for source in (form["embedding_name"], form["max_steps"]):
        source.change(
            lambda name, steps: embedding_status(services, name, steps),
            [form["embedding_name"], form["max_steps"]],
            [embedding_info],
            queue=False,
        )
    list_outputs = [form["embedding_name"], form["template"]]
    refresh.click(lambda e, t: refresh_lists(services, e, t), list_outputs, list_outputs, queue=False)
    refresh_templates.click(
        lambda e, t: refresh_lists(services, e, t), list_outputs, list_outputs, queue=False
    )
    fill.click(
        lambda name, log_dir: fill_from_last_run(services, names, name, log_dir),
        [form["embedding_name"], form["log_dir"]],
        [*form.values(), result],
    )

    def train_job(id_task_value, *values):
        return run_training_job(services, live, names, id_task_value, *values)

    poll_outputs = [progress, loss_plot, gallery, saved, seen]
    train_button.click(
        services.wrap_job(train_job),
        [id_task, *form.values()],
        [result, extra],
        **js_event("ti_trainer_start_training"),
        show_progress="hidden",  # the progress box is the indicator
    ).then(
        lambda e, t: refresh_lists(services, e, t), list_outputs, list_outputs, show_progress="hidden"
    ).then(
        lambda name, steps: embedding_status(services, name, steps),
        [form["embedding_name"], form["max_steps"]],
        [embedding_info],
        show_progress="hidden",
    ).then(lambda: poll(live, None), [], poll_outputs, show_progress="hidden")
    interrupt.click(
        lambda: request_interrupt(services, live), [], [progress], queue=False, show_progress="hidden"
    )
    poll_button.click(
        lambda version: poll(live, version), [seen], poll_outputs, queue=False, show_progress="hidden"
    )
    page_load = PageLoad(
        lambda *values: open_page(services, live, names, *values),
        [form["embedding_name"], form["template"], form["max_steps"]],
        [*form.values(), embedding_info, *poll_outputs],
    )
    return TrainPanel(form, form["embedding_name"], train_button, result, live, page_load)
