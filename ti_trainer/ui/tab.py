"""The whole tab: Create embedding, Train, Prepare, Results. The WebUI and the standalone app serve the same."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr

from ti_trainer.progress import LiveRun
from ti_trainer.ui.common import PageLoad, note
from ti_trainer.ui.create_panel import build_create_panel
from ti_trainer.ui.train_handlers import refresh_lists
from ti_trainer.ui.train_panel import build_train_panel

if TYPE_CHECKING:
    from ti_trainer.host.base import HostServices


def build_tab(services: HostServices, live: LiveRun | None = None) -> gr.Blocks:
    """The tab's Blocks (A1111: returned from `on_ui_tabs`; standalone: rendered into the app)."""
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Tabs(elem_id="ti_trainer_tabs"):
            with gr.Tab("Create embedding", elem_id="ti_trainer_tab_create"):
                create = build_create_panel(services)
            with gr.Tab("Train", elem_id="ti_trainer_tab_train"):
                train = build_train_panel(services, live)
            with gr.Tab("Prepare", elem_id="ti_trainer_tab_prepare"):
                _mount("ti_trainer.ui.prepare_panel", "build_prepare_panel", services)
            with gr.Tab("Results", elem_id="ti_trainer_tab_results"):
                results = _mount("ti_trainer.ui.results_panel", "build_results_panel", services)
        # A new embedding appears in the Train tab's list at once, and becomes the one to train.
        create.created.then(
            lambda name, template: refresh_lists(services, name, template),
            [create.name, train.form["template"]],
            [train.embedding, train.form["template"]],
        )
        # The WebUI builds the tab once, when it starts; what changed since (embeddings, runs, a run finished
        # or going on) is read again whenever a page opens. A load event of this Blocks survives `render()`
        # into the WebUI's page (Gradio 3.41 and 4.x copy it with the other events).
        for page_load in (train.page_load, results):
            if isinstance(page_load, PageLoad):
                tab.load(page_load.fn, page_load.inputs, page_load.outputs, queue=False)
    return tab


def _mount(module_name: str, function: str, services: HostServices):
    """A panel from its own module (what its build function returns); a note in its place, and None, while
    that module is not there yet."""
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        gr.HTML(note("info", "This panel is not installed in this version."))
        return None
    return getattr(module, function)(services)
