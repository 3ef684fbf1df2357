"""What a host gives the panels, the CLI and the API: folders, the loaded model, previews, progress.

The same panels serve the A1111 tab and the standalone app; they reach the world only through this object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ti_trainer.backends.contract import Backend, PreviewRequest
from ti_trainer.config import TrainConfig
from ti_trainer.progress import LiveRun, RunProgress

if TYPE_CHECKING:
    from ti_trainer.training.loop import TrainResult


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

    def train(
        self, config: TrainConfig, live: LiveRun, should_stop: Callable[[], bool] | None = None
    ) -> TrainResult:
        """Train on the host's model with its previews, progress bar and Interrupt (or `should_stop`);
        whatever was saved is usable at once afterwards, however the run ended."""
        # The launcher brings torch; the panels load without it until a run starts.
        from ti_trainer.launch import launch

        return launch(
            config,
            self.get_backend,
            live,
            should_stop=should_stop or self.interrupt_requested,
            render_preview=self.render_preview,
            on_progress=self._report_progress,
            refresh_embeddings=self.refresh_embeddings,
        )

    def _report_progress(self, run: RunProgress) -> None:
        """The host's progress bar counts the steps of this run (a resumed run starts it at 0)."""
        loss = "" if run.loss is None else f", loss {run.loss:.4f}"
        self.job_progress(
            run.step - run.first_step, run.end_step - run.first_step, f"Step {run.step}/{run.end_step}{loss}"
        )
