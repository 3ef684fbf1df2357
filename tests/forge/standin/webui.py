"""Forge's start-up (webui.py, as A1111's) as it concerns extensions' routes.

`start()` returns the FastAPI app the WebUI would serve for the flags in `shared.cmd_opts`:
- default: the Gradio app (a plain FastAPI app stands for it here); the WebUI's API is added to it only with
  `--api`; then the `on_app_started` callbacks run with (demo, app).
- `--nowebui`: an API-only app: the WebUI's API always, then the callbacks with (None, app).
`--gradio-auth` puts a login in front of Gradio's own pages only; routes added to the app (the WebUI's API,
extensions' routes) are not behind it, which is why an extension must follow `--api` / `--api-auth` itself.
"""

from fastapi import FastAPI
from modules import call_queue, script_callbacks, shared


class Demo:
    """Stands for the gr.Blocks the WebUI hands to `on_app_started` callbacks."""


def create_api(app):
    from modules.api.api import Api

    return Api(app, call_queue.queue_lock)


def api_only() -> FastAPI:
    app = FastAPI()
    create_api(app)
    script_callbacks.app_started_callback(None, app)
    return app


def webui() -> FastAPI:
    app = FastAPI()
    if shared.cmd_opts.api:
        create_api(app)
    script_callbacks.app_started_callback(Demo(), app)
    return app


def start() -> FastAPI:
    return api_only() if shared.cmd_opts.nowebui else webui()
