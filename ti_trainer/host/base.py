"""What a host gives the panels, the CLI and the API: folders, the loaded model, previews, progress.

The same panels serve the A1111 tab and the standalone app; they reach the world only through this object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ti_trainer.backends.contract import Backend, PreviewRequest


@dataclass
class HostServices:
    name: str  # "a1111" | "forge" | "standalone"
    embeddings_dir: Path
    templates_dirs: list[Path]
    log_dir: Path
    models_dir: Path  # where downloaded helper models (e.g. BLIP) are kept
    # The backend over the model the host has loaded (built lazily: loading can be slow).
    get_backend: Callable[[], Backend]
    # Generate a preview the host's way (A1111: txt2img processing); None: the backend renders.
    render_preview: Callable[[PreviewRequest], Image.Image | None] | None = None
    # Make files just written into embeddings_dir usable at once (A1111: reload the embedding database).
    refresh_embeddings: Callable[[], None] = lambda: None
    # Captioners the host already has, by label (A1111: "BLIP (WebUI)", "deepbooru"): image -> caption.
    captioners: dict[str, Callable[[Image.Image], str]] = field(default_factory=dict)
    # Defaults from the host's settings page, keyed like TrainConfig fields.
    defaults: dict[str, object] = field(default_factory=dict)
    # Long jobs (training, preprocessing) go through the host's queue and progress machinery.
    # A1111: wrap_gradio_gpu_call and shared.state; standalone: a lock and an Event.
    wrap_job: Callable[[Callable], Callable] = lambda fn: fn
    job_progress: Callable[[int, int, str], None] = lambda done, total, text: None
    interrupt_requested: Callable[[], bool] = lambda: False
    request_interrupt: Callable[[], None] = lambda: None
