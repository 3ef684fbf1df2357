"""Every panel of the tab built as the page gets it, and its buttons driven through the wiring the page uses.

`Page` holds each component's value as the browser would and fires an event the way Gradio does: the
handler bound to that component, with the values of its inputs, its results written to its outputs, then
the handlers chained after it with `.then`. So a test fails when a button is bound to nothing, to the wrong
inputs, or writes its results to the wrong place, not only when a handler is wrong.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import gradio as gr
from gradio_events import Event, events
from PIL import Image

from ti_trainer.prepare.preprocess import CROP_MODES
from ti_trainer.ui.tab import build_tab
from ti_trainer.ui.train_form import form_fields

PANELS = {
    "create": "ti_trainer_tab_create",
    "train": "ti_trainer_tab_train",
    "prepare": "ti_trainer_tab_prepare",
    "results": "ti_trainer_tab_results",
}


def descendants(block) -> list:
    found = []
    for child in getattr(block, "children", []):
        found += [child, *descendants(child)]
    return found


def values_of(choices) -> list:
    """Choices as values: Gradio keeps (label, value) pairs on the component, updates carry plain values."""
    return [choice[1] if isinstance(choice, tuple) else choice for choice in choices or []]


class Page:
    """The built tab, as the browser holds it: every component's value and choices, and its events."""

    def __init__(self, tab: gr.Blocks):
        self.tab = tab
        self.values = {key: getattr(block, "value", None) for key, block in tab.blocks.items()}
        self.choices = {key: getattr(block, "choices", None) for key, block in tab.blocks.items()}
        self.events = events(tab)

    def panel(self, name: str) -> list:
        (tab,) = [b for b in self.tab.blocks.values() if isinstance(b, gr.Tab) and b.elem_id == PANELS[name]]
        return descendants(tab)

    def find(self, panel: str, label: str, kind: type = gr.components.Component):
        """The one component of `kind` in `panel` with this label (a button's label is its value)."""
        matches = [
            block
            for block in self.panel(panel)
            if isinstance(block, kind)
            and (
                getattr(block, "label", None) == label
                or (isinstance(block, gr.Button) and block.value == label)
            )
        ]
        assert len(matches) == 1, f"{len(matches)} components labelled {label!r} in the {panel} panel"
        return matches[0]

    def by_id(self, elem_id: str):
        (block,) = [b for b in self.tab.blocks.values() if b.elem_id == elem_id]
        return block

    def value(self, block):
        return self.values[block._id]

    def set(self, block, value) -> None:
        self.values[block._id] = value

    def handled_events(self, block) -> list[str]:
        return [
            trigger
            for event in self.events
            for target, trigger in event.triggers
            if target == block._id and trigger != "then"
        ]

    def listener(self, block, event: str) -> Event:
        (found,) = [e for e in self.events if (block._id, event) in e.triggers]
        return found

    def outputs_of(self, block, event: str = "click") -> list:
        return self.listener(block, event).outputs

    def fire(self, block, event: str = "click") -> None:
        self._run(self.listener(block, event))

    def _run(self, event: Event) -> None:
        result = event.fn(*(self.values[b._id] for b in event.inputs))
        if inspect.isgenerator(result):
            *_, result = result  # the page ends showing the last value a generator yields
        outputs = event.outputs
        results = [result] if len(outputs) == 1 else list(result or [None] * len(outputs))
        assert len(results) == len(outputs), f"{event.name} gave {len(results)} values for {len(outputs)}"
        for block, value in zip(outputs, results):
            if isinstance(value, dict) and value.get("__type__") in ("update", "generic_update"):
                if "choices" in value:
                    self.choices[block._id] = value["choices"]
                if "value" in value:
                    self.values[block._id] = value["value"]
            else:
                self.values[block._id] = value
        for after in self.events:
            if after.after == event.key:
                self._run(after)


def test_every_panel_is_built_with_its_controls_and_every_button_is_wired(services):
    page = Page(build_tab(services))

    create = {block.label for block in page.panel("create") if getattr(block, "label", None)}
    assert {"Name", "Initialization text", "Number of vectors per token", "Overwrite old embedding"} <= create
    vectors = page.find("create", "Number of vectors per token", gr.Slider)
    assert (vectors.minimum, vectors.maximum, vectors.value) == (1, 75, 1)

    train_ids = {block.elem_id for block in page.panel("train")}
    assert {f"ti_trainer_train_{name}" for name in form_fields()} <= train_ids
    templates = page.find("train", "Prompt template", gr.Dropdown)
    assert {"style_filewords.txt", "subject_filewords.txt", "filewords_name.txt"} <= set(
        values_of(templates.choices)
    )
    page.find("train", "Train Embedding", gr.Button)

    crop = page.find("prepare", "Crop: center, focal point, or keep aspect ratio (buckets)", gr.Radio)
    assert values_of(crop.choices) == list(CROP_MODES) and crop.value == "center"
    for label in ("Source folder (only read, never changed)", "Destination folder (the prepared dataset)"):
        page.find("prepare", label, gr.Textbox)

    log_dir = page.find("results", "Log directory", gr.Textbox)
    assert log_dir.value == str(services.log_dir)
    assert values_of(page.find("results", "Run (date/name)", gr.Dropdown).choices) == []  # no run yet

    for panel in PANELS:
        buttons = [block for block in page.panel(panel) if isinstance(block, gr.Button)]
        assert buttons, f"the {panel} panel has no buttons"
        unwired = [button.value for button in buttons if not page.handled_events(button)]
        assert not unwired, f"buttons of the {panel} panel that do nothing: {unwired}"


def test_create_then_train_then_results_through_the_page(services, train_values):
    page = Page(build_tab(services))

    page.set(page.find("create", "Name", gr.Textbox), "shapes")
    page.set(page.find("create", "Initialization text", gr.Textbox), "painting")
    page.set(page.find("create", "Number of vectors per token", gr.Slider), 2)
    page.fire(page.find("create", "Create embedding", gr.Button))

    assert (services.embeddings_dir / "shapes.pt").is_file()
    assert "ti-trainer-ok" in page.value(page.by_id("ti_trainer_create_result"))
    # The new embedding is offered on the Train panel, and chosen.
    embedding = page.by_id("ti_trainer_train_embedding_name")
    assert "shapes" in values_of(page.choices[embedding._id]) and page.value(embedding) == "shapes"

    names, values = train_values("shapes")
    for name, value in zip(names, values):
        page.set(page.by_id(f"ti_trainer_train_{name}"), value)
    page.set(page.by_id("ti_trainer_task_id"), "task(1)")
    page.fire(page.find("train", "Train Embedding", gr.Button))

    assert "finished at 4 steps" in page.value(page.by_id("ti_trainer_train_result"))
    assert "Already trained 4 steps" in page.value(page.by_id("ti_trainer_train_embedding_status"))

    page.fire(page.find("results", "🔄 Refresh", gr.Button))

    run = page.find("results", "Run (date/name)", gr.Dropdown)
    (label,) = values_of(page.choices[run._id])
    assert label.endswith("/shapes") and page.value(run) == label
    chart = page.value(page.find("results", "Training and validation loss", gr.Image))
    assert isinstance(chart, Image.Image)
    assert {"2", "4"} <= {
        str(step) for step in values_of(page.choices[page.find("results", "Saved step")._id])
    }


def test_prepare_writes_the_dataset_and_opens_its_captions(services, dataset, tmp_path):
    page = Page(build_tab(services))
    prepared = tmp_path / "prepared"

    page.set(page.find("prepare", "Source folder (only read, never changed)"), str(dataset))
    page.set(page.find("prepare", "Destination folder (the prepared dataset)"), str(prepared))
    page.set(page.find("prepare", "Output size (px): 512 for SD 2.x base, 768 for 768-v"), 64)
    page.fire(page.find("prepare", "Prepare", gr.Button))

    written = sorted(p.name for p in prepared.glob("*.png"))
    assert len(written) == 4 and all(Image.open(prepared / name).size == (64, 64) for name in written)
    # Prepare points the caption editor and the report at what it wrote, and loads the first page.
    folders = [b for b in page.panel("prepare") if getattr(b, "label", None) == "Dataset folder"]
    assert [Path(page.value(b)) for b in folders] == [prepared, prepared]
    captions = [page.value(b) for b in page.panel("prepare") if isinstance(b, gr.Textbox) and b.lines == 3]
    assert sum(1 for text in captions if text and "simple shapes" in text) == 4

    report = page.find("prepare", "Report", gr.Button)
    page.fire(report)
    (shown,) = page.outputs_of(report)
    assert f"4 images in {prepared}" in page.value(shown)


def test_the_train_panel_estimates_gpu_memory_for_its_settings(services, train_values):
    """The "Estimate GPU memory" button works the estimate out for the form's settings on the host's model
    (no GPU) and puts the largest batch that fits into the planner, which builds its splits from it."""
    page = Page(build_tab(services))
    names, values = train_values("shapes")
    for name, value in zip(names, values):
        page.set(page.by_id(f"ti_trainer_train_{name}"), value)
    page.set(page.by_id("ti_trainer_train_width"), 64)
    page.set(page.by_id("ti_trainer_train_height"), 64)
    page.fire(page.find("train", "Estimate GPU memory", gr.Button))

    shown = page.value(page.by_id("ti_trainer_memory_estimate"))
    assert "fits in 8 GB at 64 px" in shown and "GiB (estimate)" in shown
    most = page.value(page.by_id("ti_trainer_plan_max_batch"))
    assert isinstance(most, int) and most >= 2  # the tiny model fits many 64 px images in 7.5 GiB
    assert f"The most that fits at this size: batch {most}." in shown


def test_a_click_on_an_even_split_fills_the_batch_fields(services, dataset):
    page = Page(build_tab(services))
    data_dir = page.by_id("ti_trainer_train_data_dir")
    splits = page.by_id("ti_trainer_plan_splits")

    page.set(data_dir, str(dataset))
    page.fire(data_dir, "change")
    page.set(splits, 1)  # what the browser sends for a click on the second row (type="index")
    page.fire(splits)

    batch, accumulation = (
        page.by_id("ti_trainer_train_batch_size"),
        page.by_id("ti_trainer_train_gradient_accumulation"),
    )
    assert (page.value(batch), page.value(accumulation)) == (2, 2)  # 4 images: 4x1, then 2x2
