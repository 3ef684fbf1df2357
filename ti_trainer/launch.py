"""The one place a run is wired: hooks and monitors around the training loop, reporting into a `LiveRun`.

The CLI (its progress bar and Ctrl+C), the panels (their live view) and the API's jobs all start runs here;
they differ only in what they pass: how to stop, how the host renders previews, where messages also go, and
what to do after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ti_trainer.analysis.monitors import monitors_for
from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.progress import LiveRun, RunProgress
from ti_trainer.training.loop import StepReport, TrainingHooks, TrainResult, train

MessageSink = Callable[[str], None]


def launch(
    config: TrainConfig,
    get_backend: Callable[[], object],
    live: LiveRun,
    should_stop: Callable[[], bool] = lambda: False,
    render_preview: Callable[[PreviewRequest], object] | None = None,
    message_sinks: Sequence[MessageSink] = (),
    on_progress: Callable[[RunProgress], None] = lambda progress: None,
    refresh_embeddings: Callable[[], None] = lambda: None,
) -> TrainResult:
    """Train `config` on the backend `get_backend()` gives, keeping `live` up to date; returns the result.

    The backend is asked for inside, so loading a model shows as "preparing". However the run ends,
    `refresh_embeddings` makes what it saved usable (the WebUI reloads its embeddings) before `live` says it
    ended. An error is recorded in `live` (status "failed", its message) and raised again for the caller.
    """
    live.begin(config.embedding_name, config.max_steps, config.to_dict())

    def message(text: str) -> None:
        live.message(text)
        for sink in message_sinks:
            sink(text)

    def step_done(report: StepReport) -> None:
        live.on_step(report)
        on_progress(live.snapshot())

    def stop_requested() -> bool:
        if not should_stop():
            return False
        live.stopping()
        return True

    try:
        hooks = TrainingHooks(
            on_step=step_done,
            on_message=message,
            should_stop=stop_requested,
            render_preview=render_preview,
            on_saved=live.saved,
            on_preview=live.previewed,
            monitors=monitors_for(config, message, on_validation_loss=live.validation_point),
        )
        try:
            result = train(config, get_backend(), hooks)
        finally:
            refresh_embeddings()
    except Exception as error:
        live.fail(failure_text(error))
        raise
    live.finish(result)
    return result


def failure_text(error: BaseException) -> str:
    """What a failed run says: a UserError is already a message; anything else names its kind."""
    if isinstance(error, UserError):
        return str(error)
    return f"Training stopped by an error: {type(error).__name__}: {error}"
