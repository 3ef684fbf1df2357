"""The terminal's side of a long job: Ctrl+C that stops cleanly, and a run's progress bar.

Used by `train` and `demo` (a training run through the launcher) and by `preprocess` (Ctrl+C only).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from ti_trainer.config import TrainConfig
from ti_trainer.progress import LiveRun, RunProgress


class StopOnInterrupt:
    """The first Ctrl+C asks the run to stop at the next step boundary and save; the second aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving... (Ctrl+C again to abort)", file=sys.stderr)


class ProgressBar:
    """A tqdm bar drawn from the run's progress record, opened at the first step (a resumed run's bar starts
    where the run starts)."""

    def __init__(self):
        self._bar = None

    def show(self, run: RunProgress) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=run.end_step, initial=run.first_step, unit="step", dynamic_ncols=True)
        loss = "—" if run.loss is None else f"{run.loss:.4f}"
        self._bar.set_postfix(loss=loss, lr=f"{run.learn_rate or 0:g}", epoch=run.epoch, refresh=False)
        self._bar.update(run.step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def print_message(text: str) -> None:
    print(text, file=sys.stderr)


def train_in_terminal(config: TrainConfig, get_backend: Callable[[], object]):
    """Train with a progress bar on stderr; the first Ctrl+C stops after the step and saves."""
    from ti_trainer.launch import launch  # the training stack loads only for the verbs that train

    bar = ProgressBar()
    with StopOnInterrupt() as stop:
        try:
            return launch(
                config,
                get_backend,
                LiveRun(),
                should_stop=lambda: stop.requested,
                message_sinks=[print_message],
                on_progress=bar.show,
            )
        finally:
            bar.close()
