"""Training runs as jobs: each in a background thread, with an id, its progress, and an Interrupt.

The API starts runs here (POST .../train returns at once with the id; GET .../progress/<id> follows it). The
registry knows no host: `run_exclusive` is how the host keeps one GPU job at a time (the WebUI: its queue lock
and `shared.state`, so a run never overlaps a generation), and the host services give the model, previews,
progress and the embedding refresh.
"""

from __future__ import annotations

import threading
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.launch import failure_text
from ti_trainer.progress import LiveRun, RunProgress


@dataclass
class _Job:
    config: TrainConfig
    live: LiveRun
    stop: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


class JobRegistry:
    def __init__(
        self,
        services: HostServices,
        run_exclusive: Callable[[Callable[[], None]], None] = lambda run: run(),
        keep_jobs: int = 100,
    ):
        self.services = services
        self.run_exclusive = run_exclusive
        self.keep_jobs = keep_jobs
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, config: TrainConfig) -> str:
        """Check the config, then train it in the background; returns the job's id at once."""
        config.validate()
        job_id = uuid.uuid4().hex[:12]
        job = _Job(config, LiveRun(job_id))
        job.live.queue()
        with self._lock:
            self._jobs[job_id] = job
            while len(self._jobs) > self.keep_jobs and next(iter(self._jobs.values())).live.snapshot().done:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job,), name=f"ti-trainer-{job_id}", daemon=True).start()
        return job_id

    def progress(self, job_id: str) -> RunProgress:
        """A copy of the job's progress (KeyError for an unknown id)."""
        return self._job(job_id).live.snapshot()

    def interrupt(self, job_id: str) -> RunProgress:
        """Ask the job to stop at the next step boundary; it saves its vectors as on the WebUI's Interrupt."""
        job = self._job(job_id)
        job.stop.set()
        job.live.stopping()
        return self.progress(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> RunProgress:
        self._job(job_id).finished.wait(timeout)
        return self.progress(job_id)

    def _job(self, job_id: str) -> _Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _run(self, job: _Job) -> None:
        try:
            self.run_exclusive(lambda: self._train(job))
        except Exception as error:  # the job thread is the last place to catch it: report, don't vanish
            if not isinstance(error, UserError):
                job.live.message(traceback.format_exc())
            job.live.fail(failure_text(error))
        finally:
            job.finished.set()

    def _train(self, job: _Job) -> None:
        if job.stop.is_set():
            job.live.cancel()
            return
        self.services.train(
            job.config, job.live, should_stop=lambda: job.stop.is_set() or self.services.interrupt_requested()
        )
