"""Long jobs the WebUI's way, for A1111 and Forge alike: its queue lock, `shared.state`, its progress bar's
task id, and the captioners it already has.

Both WebUIs keep A1111's `call_queue`, `progress` and `shared.state`, so one description serves both; each
host hands in its WebUI's modules (only host/a1111.py and host/forge.py import them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

from PIL import Image


class WebuiJobs:
    def __init__(self, shared: ModuleType, call_queue: ModuleType, progress: ModuleType):
        self.shared, self.call_queue, self.progress = shared, call_queue, progress

    def wrap_job(self, handler: Callable) -> Callable:
        """A panel handler as a WebUI GPU job: the queue lock, shared.state, and the progress bar's task id.

        Not `call_queue.wrap_gradio_gpu_call`: that one appends timing HTML to the last output and answers
        an exception with one output more than the handler has, which only fits the built-in Train tab's.
        """

        @functools.wraps(handler)
        def job(*args, **kwargs):
            task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
            if task:
                self.progress.add_task_to_queue(task)
            with self.call_queue.queue_lock:
                self.shared.state.begin(job="ti-trainer")
                self.progress.start_task(task)
                try:
                    return handler(*args, **kwargs)
                finally:
                    self.progress.finish_task(task)
                    self.shared.state.end()

        return job

    def run_exclusive(self, run: Callable[[], None]) -> None:
        """One GPU job at a time, as the WebUI's own jobs: its queue lock, and shared.state begun and ended."""
        with self.call_queue.queue_lock:
            self.shared.state.begin(job="ti-trainer")
            try:
                run()
            finally:
                self.shared.state.end()

    def report_progress(self, done: int, total: int, text: str) -> None:
        """Feed the WebUI's progress bar (it reads job_no / job_count) and its status text."""
        state = self.shared.state
        state.job_count, state.job_no, state.sampling_step, state.textinfo = total, done, 0, text

    def caption_with_blip(self, image: Image.Image) -> str:
        return self.shared.interrogator.interrogate(image.convert("RGB"))
