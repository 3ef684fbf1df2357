"""The standalone host: `python -m ti_trainer app` serves the WebUI tab's panels on the diffusers backend.

Everything lives under one workspace folder (embeddings/, textual_inversion/ for logs, templates/, models/);
the model is loaded on first use and kept. Jobs run one at a time under a lock, and Interrupt is an Event the
training loop checks between steps. The server listens on 127.0.0.1 only: it can read and write files where
its user points it, so it is not for the network.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT_FILE = REPO_ROOT / "javascript" / "ti_trainer.js"
STYLE_FILE = REPO_ROOT / "style.css"
LOCALHOST = "127.0.0.1"
# The default theme fetches web fonts from the internet; a localhost app uses the fonts the machine has.
LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
LOCAL_MONO_FONTS = ["ui-monospace", "Consolas", "monospace"]


@dataclass
class JobControl:
    """One job at a time, and an Interrupt flag that each job starts with cleared.

    Progress needs no machinery here: the panels show it themselves (ui/live_run.py).
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    interrupt: threading.Event = field(default_factory=threading.Event)

    def wrap(self, fn: Callable) -> Callable:
        @wraps(fn)
        def run_alone(*args, **kwargs):
            with self.lock:
                self.interrupt.clear()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.interrupt.clear()

        return run_alone


def standalone_services(workspace: str | Path, model: str = "tiny", device: str = "auto") -> HostServices:
    workspace = Path(workspace).expanduser().resolve()
    folders = {
        "embeddings_dir": workspace / "embeddings",
        "log_dir": workspace / "textual_inversion",
        "models_dir": workspace / "models",
    }
    templates = workspace / "templates"
    for folder in (*folders.values(), templates):
        folder.mkdir(parents=True, exist_ok=True)
    jobs = JobControl()
    backend_lock = threading.Lock()
    loaded: list = []

    def get_backend():
        # Loading a real model takes a while; the first caller loads it, the others wait for that one.
        with backend_lock:
            if not loaded:
                from ti_trainer.backends.loading import load_backend

                loaded.append(load_backend(model, device))
            return loaded[0]

    return HostServices(
        name="standalone",
        templates_dirs=[templates],
        get_backend=get_backend,
        wrap_job=jobs.wrap,
        interrupt_requested=jobs.interrupt.is_set,
        request_interrupt=jobs.interrupt.set,
        **folders,
    )


def page_script() -> str:
    """Our javascript/ file as a Gradio load-time function (the WebUIs inject the file themselves)."""
    source = SCRIPT_FILE.read_text(encoding="utf-8") if SCRIPT_FILE.is_file() else ""
    return f"() => {{\n{source}\n}}"


def page_style() -> str:
    return STYLE_FILE.read_text(encoding="utf-8") if STYLE_FILE.is_file() else ""


def build_app(services: HostServices):
    import gradio as gr

    from ti_trainer.ui.compat import queue_options, run_js_on_load
    from ti_trainer.ui.tab import build_tab

    tab = build_tab(services)  # built outside the app's context, then rendered into it, as the WebUI does
    theme = gr.themes.Default(font=LOCAL_FONTS, font_mono=LOCAL_MONO_FONTS)
    with gr.Blocks(title="ti_trainer", theme=theme, css=page_style(), analytics_enabled=False) as app:
        tab.render()
        run_js_on_load(app, page_script())
    # Training holds one worker for its whole run; progress polls and live checks need others beside it.
    app.queue(**queue_options(4))
    return app


def serve(workspace: str | Path, model: str = "tiny", port: int = 7861, device: str = "auto") -> None:
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise UserError(
            "The app needs Gradio, A1111's version or Forge's: pip install gradio==3.41.2 (or gradio==4.40.0)"
        ) from error
    services = standalone_services(workspace, model, device)
    print(f"Workspace: {Path(workspace).resolve()}\nLoading the model ({model})...")
    services.get_backend()  # now, so the page answers at once when it opens
    app = build_app(services)
    print(f"Open http://{LOCALHOST}:{port} in your browser.")
    app.launch(
        server_name=LOCALHOST,
        server_port=port,
        share=False,
        inbrowser=False,
        show_api=False,
        allowed_paths=[str(services.log_dir), str(services.embeddings_dir)],
    )
