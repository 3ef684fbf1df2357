"""modules.api.api (Forge: modules/api/api.py): the WebUI's own `/sdapi/v1/*` routes, as extensions meet them.

Forge builds `Api(app, queue_lock)` only when it serves its API (`--api`, or `--nowebui`). With
`--api-auth "user:pass,..."` every route needs HTTP basic auth with one of those pairs; otherwise a 401 with
`WWW-Authenticate: Basic`. `/sdapi/v1/interrupt` stands for the rest.
"""

from secrets import compare_digest

from fastapi import Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import shared


class Api:
    def __init__(self, app, queue_lock):
        self.app = app
        self.queue_lock = queue_lock
        self.credentials = {}
        if shared.cmd_opts.api_auth:
            for pair in shared.cmd_opts.api_auth.split(","):
                user, password = pair.split(":")
                self.credentials[user] = password
        self.add_api_route("/sdapi/v1/interrupt", self.interruptapi, methods=["POST"])

    def add_api_route(self, path, endpoint, **kwargs):
        if shared.cmd_opts.api_auth:
            return self.app.add_api_route(path, endpoint, dependencies=[Depends(self.auth)], **kwargs)
        return self.app.add_api_route(path, endpoint, **kwargs)

    def auth(self, credentials: HTTPBasicCredentials = Depends(HTTPBasic())):  # noqa: B008
        password = self.credentials.get(credentials.username)
        if password is not None and compare_digest(credentials.password, password):
            return True
        raise HTTPException(401, "Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    def interruptapi(self):
        shared.state.interrupt()
        return {}
