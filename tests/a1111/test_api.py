"""The HTTP routes: create, train as a job with an id, progress, interrupt; the WebUI's --api-auth enforced."""

import base64
import time

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ti_trainer.host import a1111

ROUTES = [
    ("post", "/ti-trainer/v1/create", {"name": "x"}),
    ("post", "/ti-trainer/v1/train", {"embedding_name": "x", "batch_size": 0}),  # refused: starts no job
    ("get", "/ti-trainer/v1/progress/abc", None),
    ("post", "/ti-trainer/v1/interrupt/abc", None),
]


def client_for(webui, api_auth=None) -> TestClient:
    from modules import shared

    shared.cmd_opts.api_auth = api_auth
    app = FastAPI()
    a1111.add_api_routes(None, app)
    return TestClient(app)


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
    client = client_for(webui, "alice:secret,bob:pass:word")
    for headers in (None, basic("alice", "wrong"), basic("mallory", "secret"), basic("alice", "secret,bob")):
        response = call(client, method, path, body, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["WWW-Authenticate"] == "Basic"
    for user, password in (("alice", "secret"), ("bob", "pass:word")):
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
        "embeddings_dir": "/somewhere/else",  # the host's folder wins
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
    assert progress["step"] == 2 and progress["embedding_path"] == str(webui.embeddings_dir / "apiemb.pt")
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
