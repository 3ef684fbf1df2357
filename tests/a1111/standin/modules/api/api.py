"""modules.api.api: the WebUI's own HTTP API (`/sdapi/v1/*`), as far as extensions meet it.

A1111 builds `Api(app, queue_lock)` only when it serves its API (webui.py: `--api`, or `--nowebui`). With
`--api-auth "user:pass,..."` each of its routes needs HTTP basic auth with one of those pairs; a wrong or missing
pair is a 401 with `WWW-Authenticate: Basic`. Two of its embedding routes stand for the rest here.
"""

from secrets import compare_digest

from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import sd_hijack, shared


class Api:
    def __init__(self, app, queue_lock):
        self.app = app
        self.queue_lock = queue_lock
        self.credentials = {}
        if shared.cmd_opts.api_auth:
            # As the WebUI reads the flag: pairs split at commas, each at its colon.
            for pair in shared.cmd_opts.api_auth.split(","):
                user, password = pair.split(":")
                self.credentials[user] = password
        self.add_api_route("/sdapi/v1/embeddings", self.get_embeddings, methods=["GET"])
        self.add_api_route("/sdapi/v1/refresh-embeddings", self.refresh_embeddings, methods=["POST"])

    def add_api_route(self, path, endpoint, **kwargs):
        if shared.cmd_opts.api_auth:
            kwargs["dependencies"] = [Depends(self.auth)]
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):  # noqa: B008
        password = self.credentials.get(credentials.username)
        if password is not None and compare_digest(credentials.password, password):
            return True
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    def get_embeddings(self):
        database = sd_hijack.model_hijack.embedding_db
        return {"loaded": {name: {"step": e.step} for name, e in database.word_embeddings.items()}}

    def refresh_embeddings(self):
        with self.queue_lock:
            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
