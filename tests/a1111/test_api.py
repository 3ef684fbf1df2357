"""The HTTP routes: create, train as a job with an id, progress, interrupt; present only where the WebUI serves
its API (--api, --nowebui), behind its --api-auth; a request cannot move the host's folders."""

import base64
import csv
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ti_trainer.host import a1111

ROUTES = [
    ("post", "/ti-trainer/v1/create", {"name": "x"}),
    ("post", "/ti-trainer/v1/train", {"embedding_name": "x", "batch_size": 0}),  # refused: starts no job
    ("get", "/ti-trainer/v1/progress/abc", None),
    ("post", "/ti-trainer/v1/interrupt/abc", None),
]


def started_webui(**flags) -> TestClient:
    """The app the stand-in WebUI serves with these command-line flags, our extension loaded."""
    import webui as webui_startup
    from modules import script_callbacks, shared

    vars(shared.cmd_opts).update(flags)
    script_callbacks.clear_callbacks()
    a1111.register_callbacks()
    return TestClient(webui_startup.start())


def client_for(webui, api_auth=None) -> TestClient:
    return started_webui(api=True, api_auth=api_auth)


def basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def call(client, method, path, body, headers=None):
    return (
        getattr(client, method)(path, json=body, headers=headers)
        if body
        else getattr(client, method)(path, headers=headers)
    )


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_with_api_auth_every_route_needs_the_webuis_credentials(webui, method, path, body):
    client = client_for(webui, "alice:secret,bob:pass-word")  # the WebUI splits at every colon
    for headers in (None, basic("alice", "wrong"), basic("mallory", "secret"), basic("alice", "secret,bob")):
        response = call(client, method, path, body, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"] == "Basic"
    for user, password in (("alice", "secret"), ("bob", "pass-word")):
        assert call(client, method, path, body, basic(user, password)).status_code != 401


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_without_api_auth_no_credentials_are_needed(webui, method, path, body):
    assert call(client_for(webui), method, path, body).status_code != 401


def test_create_writes_an_embedding_the_webui_loads(webui):
    client = client_for(webui)
    response = client.post(
        "/ti-trainer/v1/create", json={"name": "apiemb", "init_text": "a dog", "num_vectors": 2}
    )
    assert response.status_code == 200, response.text
    assert (webui.embeddings_dir / "apiemb.pt").is_file()
    assert webui.db.word_embeddings["apiemb"].vectors == 2
    again = client.post("/ti-trainer/v1/create", json={"name": "apiemb"})
    assert again.status_code == 400 and "already exists" in again.json()["detail"]
    bad = client.post("/ti-trainer/v1/create", json={"name": "../escape"})
    assert bad.status_code == 400 and "path separator" in bad.json()["detail"]


def test_train_starts_a_job_whose_progress_can_be_followed(webui, dataset):
    client = client_for(webui)
    client.post("/ti-trainer/v1/create", json={"name": "apiemb", "init_text": "a dog", "num_vectors": 1})
    settings = {
        "embedding_name": "apiemb",
        "data_dir": str(dataset),
        "template": "subject_filewords.txt",
        "max_steps": 2,
        "width": 64,
        "height": 64,
        "preview_every": 0,
        "validate_every": 0,
    }
    response = client.post("/ti-trainer/v1/train", json=settings)
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    progress = {}
    for _ in range(600):
        progress = client.get(f"/ti-trainer/v1/progress/{job_id}").json()
        if progress["status"] in ("finished", "failed", "interrupted"):
            break
        time.sleep(0.05)
    assert progress["status"] == "finished", progress
    # The names clients have read since the first version of the route; new ones may only be added.
    assert set(progress) >= {
        "id", "status", "step", "end_step", "loss", "learn_rate", "error", "embedding_path", "log_folder",
        "last_saved", "last_preview", "messages",
    }  # fmt: skip
    assert progress["step"] == 2 and progress["embedding_path"] == str(webui.embeddings_dir / "apiemb.pt")
    # Epochs as the loss CSV counts them (from 0): 3 images, batch 1, so steps 1-3 are epoch 0.
    with (Path(progress["log_folder"]) / "textual_inversion_loss.csv").open(encoding="utf-8") as handle:
        last_row = list(csv.DictReader(handle))[-1]
    assert last_row["step"] == "2" and progress["epoch"] == int(last_row["epoch"]) == 0
    assert webui.db.word_embeddings["apiemb"].step == 2
    interrupted = client.post(f"/ti-trainer/v1/interrupt/{job_id}")
    assert interrupted.status_code == 200 and interrupted.json()["status"] == "finished"


def test_bad_requests_get_clear_answers(webui):
    client = client_for(webui)
    unknown = client.post("/ti-trainer/v1/train", json={"embedding_name": "x", "learning_rate": "0.1"})
    assert unknown.status_code == 422 and "learning_rate" in unknown.json()["detail"]
    invalid = client.post("/ti-trainer/v1/train", json={"embedding_name": "x", "batch_size": 0})
    assert invalid.status_code == 400 and "Batch size" in invalid.json()["detail"]
    for method, path in (("get", "/ti-trainer/v1/progress/nope"), ("post", "/ti-trainer/v1/interrupt/nope")):
        response = getattr(client, method)(path)
        assert response.status_code == 404 and "nope" in response.json()["detail"]


@pytest.mark.parametrize(
    ("flags", "served"),
    [
        ({}, False),
        ({"gradio_auth": "user:pass"}, False),  # a login on the pages says nothing about the API
        ({"api": True}, True),
        ({"nowebui": True}, True),
        ({"api": True, "gradio_auth": "user:pass"}, True),
    ],
)
def test_the_routes_are_there_exactly_where_the_webuis_api_is(webui, flags, served):
    client = started_webui(**flags)
    webuis_own = client.get("/sdapi/v1/embeddings")
    assert (webuis_own.status_code == 200) == served, webuis_own.text
    ours = client.post("/ti-trainer/v1/create", json={"name": "sneaky", "init_text": "a dog"})
    assert ours.status_code == (200 if served else 404), ours.text
    assert (webui.embeddings_dir / "sneaky.pt").is_file() == served
    ours_listed = {route.path for route in client.app.routes if route.path.startswith("/ti-trainer/")}
    assert len(ours_listed) == (len(ROUTES) if served else 0)


@pytest.mark.parametrize("flags", [{"api": True}, {"nowebui": True}])
def test_api_auth_guards_ours_as_it_guards_the_webuis(webui, flags):
    client = started_webui(api_auth="alice:secret", **flags)
    for path in ("/sdapi/v1/refresh-embeddings", "/ti-trainer/v1/create"):
        assert client.post(path, json={"name": "x"}).status_code == 401, path
        assert client.post(path, json={"name": "x"}, headers=basic("alice", "secret")).status_code == 200, (
            path
        )


def quick_run(dataset, **overrides) -> dict:
    settings = {
        "embedding_name": "apiemb",
        "data_dir": str(dataset),
        "template": "subject_filewords.txt",
        "max_steps": 1,
        "width": 64,
        "height": 64,
        "preview_every": 0,
        "validate_every": 0,
    }
    return {**settings, **overrides}


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("log_dir", "/tmp/elsewhere"),
        ("log_dir", "../outside"),
        ("embeddings_dir", "/somewhere/else"),
        ("embeddings_dir", "../embeddings-next-door"),
        ("templates_dirs", ["/etc"]),
        ("template", "/etc/passwd"),
        ("template", "../../secret.txt"),
    ],
)
def test_a_request_cannot_move_the_hosts_folders(webui, dataset, setting, value):
    client = client_for(webui)
    client.post("/ti-trainer/v1/create", json={"name": "apiemb"})
    response = client.post("/ti-trainer/v1/train", json=quick_run(dataset, **{setting: value}))
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert setting in detail and "outside the host's folders" in detail
    assert str(Path(value[0] if isinstance(value, list) else value)) in detail


def test_folders_inside_the_hosts_are_accepted(webui, dataset):
    from modules import shared

    client = client_for(webui)
    client.post("/ti-trainer/v1/create", json={"name": "apiemb"})
    (webui.templates_dir / "mine").mkdir()
    (webui.templates_dir / "mine" / "own.txt").write_text("a picture of [name]\n", encoding="utf-8")
    log_root = a1111.host_services().log_dir.resolve()
    settings = quick_run(
        dataset,
        log_dir="experiments",  # taken inside the host's log folder
        embeddings_dir=str(webui.embeddings_dir),
        template=str(webui.templates_dir / "mine" / "own.txt"),
    )
    response = client.post("/ti-trainer/v1/train", json=settings)
    assert response.status_code == 200, response.text
    progress = wait_for(client, response.json()["id"])
    assert progress["status"] == "finished", progress
    assert Path(progress["log_folder"]).resolve().is_relative_to(log_root / "experiments")
    assert shared.cmd_opts.embeddings_dir == str(webui.embeddings_dir)
    unknown = client.post("/ti-trainer/v1/train", json=quick_run(dataset, template="nope.txt"))
    assert unknown.status_code == 400 and "subject_filewords.txt" in unknown.json()["detail"]


def wait_for(client, job_id: str) -> dict:
    progress = {}
    for _ in range(600):
        progress = client.get(f"/ti-trainer/v1/progress/{job_id}").json()
        if progress["status"] in ("finished", "failed", "interrupted"):
            break
        time.sleep(0.05)
    return progress


def test_wrong_setting_types_are_named_before_a_job_starts(webui):
    client = client_for(webui)
    response = client.post(
        "/ti-trainer/v1/train",
        json={"embedding_name": "x", "batch_size": "2", "max_steps": None, "keep_size": 1},
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    for expected in (
        "batch_size: expected a whole number, got text '2'",
        "max_steps: expected a whole number, got null",
        "keep_size: expected true or false, got number 1",
    ):
        assert expected in detail
