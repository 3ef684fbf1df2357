"""The scripts/ entry as Forge loads it: it finds Forge and registers the Forge host's tab, settings section
and routes; the routes exist only where Forge serves its API (--api, --nowebui), behind its --api-auth."""

import base64
import importlib.util
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ti_trainer.config import TrainConfig
from ti_trainer.host import forge as forge_host

ENTRY = Path(__file__).resolve().parents[2] / "scripts" / "ti_trainer_tab.py"
ROUTES = [
    ("post", "/ti-trainer/v1/create", {"name": "x"}),
    ("post", "/ti-trainer/v1/train", {"embedding_name": "x", "batch_size": 0}),
    ("get", "/ti-trainer/v1/progress/abc", None),
    ("post", "/ti-trainer/v1/interrupt/abc", None),
]


def load_entry():
    """What the WebUI's script loader does with each file in scripts/."""
    spec = importlib.util.spec_from_file_location("ti_trainer_tab", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def started_forge(**flags) -> TestClient:
    import webui as forge_startup
    from modules import script_callbacks, shared

    vars(shared.cmd_opts).update(flags)
    script_callbacks.clear_callbacks()
    load_entry()
    return TestClient(forge_startup.start())


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def call(client, method, path, body, headers=None):
    if body:
        return getattr(client, method)(path, json=body, headers=headers)
    return getattr(client, method)(path, headers=headers)


def test_the_entry_finds_forge_and_registers_the_forge_host(forge):
    from modules import script_callbacks

    module = load_entry()
    assert module.host is forge_host
    registered = {
        category: [c.callback for c in callbacks]
        for category, callbacks in script_callbacks.callback_map.items()
    }
    assert registered["callbacks_ui_tabs"] == [forge_host.ui_tabs]
    assert registered["callbacks_ui_settings"] == [forge_host.add_settings]
    assert registered["callbacks_app_started"] == [forge_host.add_api_routes]


def test_the_tab_builds_from_the_forge_host_services(forge):
    import gradio as gr
    from modules import script_callbacks

    load_entry()
    tabs = script_callbacks.ui_tabs_callback()
    assert not script_callbacks.errors, script_callbacks.errors
    blocks, title, elem_id = tabs[0]
    assert isinstance(blocks, gr.Blocks) and (title, elem_id) == ("TI Trainer", "ti_trainer")


def test_the_settings_section_is_on_forges_settings_page(forge):
    from modules import script_callbacks, shared

    load_entry()
    script_callbacks.ui_settings_callback()
    assert not script_callbacks.errors, script_callbacks.errors
    info = shared.opts.data_labels["ti_trainer_batch_size"]
    assert info.section == ("ti_trainer", "TI Trainer") and info.category_id == "training"
    services = forge_host.host_services()
    assert services.name == "forge" and services.defaults["batch_size"] == TrainConfig().batch_size
    shared.opts.ti_trainer_batch_size = 3.0
    assert services.defaults["batch_size"] == 3


def test_progress_and_interrupt_go_through_forges_state(forge):
    from modules import call_queue, progress, shared

    services = forge_host.host_services()
    services.job_progress(3, 10, "Step 3")
    assert (shared.state.job_no, shared.state.job_count, shared.state.textinfo) == (3, 10, "Step 3")
    services.request_interrupt()
    assert shared.state.interrupted and services.interrupt_requested()
    seen = {}

    def handler(task_id):
        seen.update(locked=call_queue.queue_lock.locked(), job=shared.state.job, task=progress.current_task)
        return "done"

    assert services.wrap_job(handler)("task(abc)") == "done"
    assert seen == {"locked": True, "job": "ti-trainer", "task": "task(abc)"}
    assert not call_queue.queue_lock.locked() and shared.state.job == ""


def route_paths(client) -> set:
    return {route.path for route in client.app.routes}


def test_the_routes_are_there_only_where_forge_serves_its_api(forge):
    ours = {"/ti-trainer/v1/create", "/ti-trainer/v1/train", "/ti-trainer/v1/progress/{job_id}"}
    assert not ours & route_paths(started_forge())
    assert ours <= route_paths(started_forge(api=True))
    assert ours <= route_paths(started_forge(api=False, nowebui=True))


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_with_api_auth_every_route_needs_forges_credentials(forge, method, path, body):
    client = started_forge(api=True, api_auth="alice:secret,bob:pass-word")
    for headers in (None, basic("alice", "wrong"), basic("mallory", "secret")):
        response = call(client, method, path, body, headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Basic"
    for user, password in (("alice", "secret"), ("bob", "pass-word")):
        assert call(client, method, path, body, basic(user, password)).status_code != 401


def test_create_through_the_api_registers_the_embedding_in_forges_engine(forge):
    client = started_forge(nowebui=True)
    response = client.post(
        "/ti-trainer/v1/create", json={"name": "apiemb", "init_text": "a dog", "num_vectors": 2}
    )
    assert response.status_code == 200, response.text
    assert (forge.embeddings_dir / "apiemb.pt").is_file()
    assert forge.engine.embeddings.word_embeddings["apiemb"].vectors == 2


def test_the_captioners_are_forges(forge, monkeypatch):
    from modules import shared
    from PIL import Image

    class Interrogator:
        def interrogate(self, image):
            return f"a {image.size[0]}px picture"

    monkeypatch.setattr(shared, "interrogator", Interrogator())
    captioners = forge_host.host_services().captioners
    image = Image.new("RGB", (16, 16), (0, 0, 255))
    assert captioners["BLIP (WebUI)"](image) == "a 16px picture"
    assert "blue background" in captioners["deepbooru"](image)
