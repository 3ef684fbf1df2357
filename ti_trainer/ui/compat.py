"""Where Gradio 3.41.2 (A1111's pin) and Gradio 4.40 (Forge's) differ: the panels call these, never a
version check of their own, so one set of panels runs in both WebUIs and in the standalone app.

What differs, and where it is handled:
- updates: `update()` builds a dictionary both versions read as a property update (Gradio 3's `gr.update`
  marks it "generic_update", 4's "update"; each reads both), so handlers need no Gradio at import;
- a browser function before an event: `_js=` in Gradio 3, `js=` in 4 (`js_event`, `run_js_on_load`);
- the queue's workers: `concurrency_count` in Gradio 3, a default limit per event in 4 (`queue_options`);
- LinePlot: Gradio 3 draws it with Vega-Lite's options (tooltip, legend position, size); 4.40's native plot
  has its own tooltip, fills its column, calls the legend's title `color_title`, and its `height` is the
  box's, not the chart's (`line_plot_look`).

The rest of what the panels use is the same in both: `.then`, `Blocks.load`, `show_progress="hidden"`,
`queue=False`, Dropdown's `allow_custom_value`, Gallery, Dataset samples. Nothing here needs a shim for
`.style()`, `gr.Box`, `every=` or a gr.File input, because no panel uses them (Gradio 4 removed `.style()`
and `gr.Box`; a gr.File input is a tempfile object in 3 and a path in 4).
"""

from __future__ import annotations

from functools import cache


@cache
def gradio_major() -> int:
    import gradio

    return int(gradio.__version__.split(".")[0])


def is_gradio_4() -> bool:
    """Gradio 4 or later (Forge); otherwise the 3.41 that A1111 pins."""
    return gradio_major() >= 4


def update(**changes) -> dict:
    """A property update that Gradio 3.41 and 4.x both apply (what 4's `gr.update` returns), without Gradio."""
    return {"__type__": "update", **changes}


def js_event(js: str) -> dict:
    """An event listener's keyword for a browser function that runs first (and may rewrite the inputs)."""
    return {"js": js} if is_gradio_4() else {"_js": js}


def run_js_on_load(blocks, js: str) -> None:
    """Run a browser function when the page opens (the standalone app's copy of our javascript/ file)."""
    blocks.load(None, None, None, **js_event(js))


def queue_options(workers: int) -> dict:
    """Keywords for `Blocks.queue` so that `workers` queued events can run at the same time.

    Gradio 3 has one pool of workers for every event; Gradio 4 limits each event listener separately (one at
    a time by default), so the same number is given as the default limit of each.
    """
    return {"default_concurrency_limit": workers} if is_gradio_4() else {"concurrency_count": workers}


def line_plot_look(legend_title: str, tooltip: list[str], width: int, height: int) -> dict:
    """LinePlot keywords for its legend, tooltip and size, as the installed Gradio reads them.

    Gradio 3 draws the chart with Vega-Lite's options, `height` being the chart's. Gradio 4.40's native plot
    warns about (and ignores) those options, and Forge's shim drops them with a warning in the console; its
    `height` is the whole box's, which then cuts off the legend below the chart, so the box is left to fit
    the chart it draws (with a tooltip of its own, as wide as its column).
    """
    if is_gradio_4():
        return {"color_title": legend_title}
    return {
        "tooltip": tooltip,
        "color_legend_position": "bottom",
        "color_legend_title": legend_title,
        "width": width,
        "height": height,
    }
