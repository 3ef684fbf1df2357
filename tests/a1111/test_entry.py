"""The scripts/ entry as the WebUI loads it: a tab of its own, a settings section in "Training", API routes;
importing it (and building the tab) never touches the network."""

import importlib.util
import socket
from pathlib import Path

import pytest
from fastapi import FastAPI

from ti_trainer.config import TrainConfig, field_info
from ti_trainer.host import a1111, webui_settings

ENTRY = Path(__file__).resolve().parents[2] / "scripts" / "ti_trainer_tab.py"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def load_entry():
    """What the WebUI's script loader does with each file in scripts/."""
    spec = importlib.util.spec_from_file_location("ti_trainer_tab", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loading_the_entry_registers_the_tab_settings_and_routes(webui, no_network):
    from modules import script_callbacks

    load_entry()
    registered = {
        category: [callback.callback for callback in callbacks]
        for category, callbacks in script_callbacks.callback_map.items()
    }
    assert registered["callbacks_ui_tabs"] == [a1111.ui_tabs]
    assert registered["callbacks_ui_settings"] == [a1111.add_settings]
    assert registered["callbacks_app_started"] == [a1111.add_api_routes]


def test_the_tab_is_our_own_and_builds_from_the_host_services(webui, no_network):
    import gradio as gr
    from modules import script_callbacks

    load_entry()
    tabs = script_callbacks.ui_tabs_callback()
    assert not script_callbacks.errors, script_callbacks.errors
    assert len(tabs) == 1
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks)
    assert (title, elem_id) == ("TI Trainer", "ti_trainer") and title != "Train"


def test_the_settings_section_holds_our_defaults_in_the_training_category(webui):
    from modules import script_callbacks, shared

    load_entry()
    script_callbacks.ui_settings_callback()
    assert not script_callbacks.errors, script_callbacks.errors
    defaults = TrainConfig()
    for field in webui_settings.SETTINGS:
        info = shared.opts.data_labels[f"ti_trainer_{field}"]
        assert info.section == ("ti_trainer", "TI Trainer") and info.category_id == "training"
        assert info.default == getattr(defaults, field) and info.label == field_info(field).label

    services = a1111.host_services()
    assert services.defaults["batch_size"] == defaults.batch_size
    shared.opts.ti_trainer_batch_size = 3.0  # as the Settings page stores a Number
    shared.opts.ti_trainer_latent_sampling = "deterministic"
    assert services.defaults["batch_size"] == 3 and services.defaults["latent_sampling"] == "deterministic"
    assert TrainConfig.from_dict(dict(services.defaults)).batch_size == 3


def test_the_routes_are_added_when_the_app_starts(webui):
    from modules import script_callbacks, shared

    shared.cmd_opts.api = True  # only where the WebUI serves its API (tests/a1111/test_api.py)
    load_entry()
    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    assert not script_callbacks.errors, script_callbacks.errors
    paths = {route.path for route in app.routes}
    assert {
        "/ti-trainer/v1/create",
        "/ti-trainer/v1/train",
        "/ti-trainer/v1/progress/{job_id}",
        "/ti-trainer/v1/interrupt/{job_id}",
    } <= paths


def test_host_services_point_at_the_webuis_folders(webui):
    from modules import shared

    services = a1111.host_services()
    assert services.name == "a1111"
    assert services.embeddings_dir == Path(shared.cmd_opts.embeddings_dir) == webui.embeddings_dir
    assert services.templates_dirs[0] == webui.templates_dir
    assert (services.templates_dirs[1] / "subject_filewords.txt").is_file()
    assert services.log_dir == Path(".", "textual_inversion")
    assert services.models_dir == Path(shared.models_path)


def test_the_captioners_are_the_webuis(webui, monkeypatch):
    from modules import shared
    from PIL import Image

    class Interrogator:
        def interrogate(self, image):
            return f"a {image.size[0]}px picture"

    monkeypatch.setattr(shared, "interrogator", Interrogator())
    captioners = a1111.host_services().captioners
    image = Image.new("RGB", (16, 16), (0, 0, 255))
    assert captioners["BLIP (WebUI)"](image) == "a 16px picture"
    assert "blue background" in captioners["deepbooru"](image)


def test_progress_and_interrupt_go_through_the_webuis_state(webui):
    from modules import shared

    services = a1111.host_services()
    services.job_progress(3, 10, "Step 3")
    assert (shared.state.job_no, shared.state.job_count, shared.state.textinfo) == (3, 10, "Step 3")
    assert not services.interrupt_requested()
    services.request_interrupt()
    assert shared.state.interrupted and services.interrupt_requested()


def test_only_the_host_modules_import_the_webuis_modules():
    import re

    package = Path(a1111.__file__).resolve().parents[1]
    importers = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if re.search(
            r"^\s*(from|import) (modules|modules_forge|backend)\b", path.read_text(encoding="utf-8"), re.M
        )
    }
    assert importers == {"host/a1111.py", "host/forge.py"}


def test_panel_jobs_hold_the_queue_and_report_their_task(webui):
    """A panel handler runs as a WebUI job: under the queue lock, with shared.state and the task id the
    progress bar polls; its outputs and exceptions pass through unchanged."""
    from modules import call_queue, progress, shared

    from ti_trainer.host.a1111 import host_services

    seen = {}

    def handler(task_id, value):
        seen["locked"] = call_queue.queue_lock.locked()
        seen["job"] = shared.state.job
        seen["current"] = progress.current_task
        return value, "<p>done</p>"

    wrapped = host_services().wrap_job(handler)
    assert wrapped("task(abc)", 3) == (3, "<p>done</p>")
    assert seen == {"locked": True, "job": "ti-trainer", "current": "task(abc)"}
    assert progress.current_task is None and "task(abc)" in progress.finished_tasks
    assert not call_queue.queue_lock.locked() and shared.state.job == ""

    def failing(task_id):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        host_services().wrap_job(failing)("task(x)")
    assert not call_queue.queue_lock.locked()
