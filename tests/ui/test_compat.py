"""The compatibility layer against the Gradio this venv has (3.41.2 in .venv-a1111, 4.40 in .venv-forge): what
it hands Gradio is taken without complaint and does what the panels mean."""

from __future__ import annotations

import warnings

import gradio as gr
import pandas as pd
from gradio_events import events

from ti_trainer.ui import compat


def test_the_version_is_the_installed_gradio():
    assert compat.gradio_major() == int(gr.__version__.split(".")[0])
    assert compat.is_gradio_4() == (gr.__version__ >= "4")


def test_an_update_is_read_as_one_by_this_gradio():
    # Gradio 3.41's own gr.update says "generic_update", 4's says "update": both read either as an update.
    is_update = getattr(gr.utils, "is_prop_update", None) or gr.utils.is_update
    assert is_update(compat.update(value=3, visible=False)) and is_update(compat.update())
    assert compat.update(value=3, visible=False) == {"__type__": "update", "value": 3, "visible": False}


def test_a_browser_function_reaches_the_event_and_the_page_load():
    with gr.Blocks() as blocks:
        button = gr.Button("Go")
        text = gr.Textbox()
        button.click(lambda value: value, [text], [text], **compat.js_event("my_js_function"))
        compat.run_js_on_load(blocks, "() => {}")
    (click,) = [event for event in events(blocks) if (button._id, "click") in event.triggers]
    assert click.js == "my_js_function"
    (load,) = [event for event in events(blocks) if any(trigger == "load" for _, trigger in event.triggers)]
    assert load.js == "() => {}" and load.fn is None


def test_the_queue_takes_its_workers():
    with gr.Blocks() as blocks:
        gr.Button("Go").click(lambda: None)
    blocks.queue(**compat.queue_options(4))  # Gradio 4 raises on Gradio 3's concurrency_count
    if compat.is_gradio_4():
        assert blocks._queue.default_concurrency_limit == 4
    else:
        assert blocks._queue.max_thread_count == 4


def test_the_line_plot_gets_only_the_options_this_gradio_knows():
    look = compat.line_plot_look(legend_title=" ", tooltip=["step", "loss"], width=360, height=200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot = gr.LinePlot(
            pd.DataFrame({"step": [1, 2], "loss": [0.5, 0.4], "curve": ["training loss"] * 2}),
            x="step",
            y="loss",
            color="curve",
            **look,
        )
    # Gradio 4.40 warns "Argument 'width' has been deprecated" (and ignores it) for each of Gradio 3's options.
    about_ours = [str(w.message) for w in caught if any(f"'{key}'" in str(w.message) for key in look)]
    assert not about_ours
    if compat.is_gradio_4():
        assert plot.color_title == " " and plot.height is None  # the box fits the chart and its legend
    else:
        assert plot.height == 200
