"""Training runs as jobs: each in a background thread, with an id, its progress, and an Interrupt.

The API starts runs here (POST .../train returns at once with the id; GET .../progress/<id> follows it). The
registry knows no host: `run_exclusive` is how the host keeps one GPU job at a time (the WebUI: its queue lock
and `shared.state`, so a run never overlaps a generation), and the host services give the model, previews,
progress and the embedding refresh.
"""

from __future__ import annotations

import dataclasses
import threading
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ti_trainer.analysis.monitors import monitors_for
from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.training.loop import StepReport, TrainingHooks, train

KEEP_MESSAGES = 50


@dataclass
class JobProgress:
    id: str
    status: str = "queued"  # queued | running | finished | interrupted | failed
    step: int = 0
    end_step: int = 0
    epoch: int = 0  # from 0, as in the loss CSV (training/outputs.epoch_of)
    loss: float | None = None
    learn_rate: float | None = None
    error: str | None = None
    embedding_path: str | None = None
    log_folder: str | None = None
    last_saved: str | None = None
    last_preview: str | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.status in ("finished", "interrupted", "failed")


@dataclass
class _Job:
    config: TrainConfig
    progress: JobProgress
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
        job = _Job(config, JobProgress(id=uuid.uuid4().hex[:12], end_step=config.max_steps))
        with self._lock:
            self._jobs[job.progress.id] = job
            while len(self._jobs) > self.keep_jobs and next(iter(self._jobs.values())).progress.done:
                self._jobs.popitem(last=False)
        threading.Thread(
            target=self._run, args=(job,), name=f"ti-trainer-{job.progress.id}", daemon=True
        ).start()
        return job.progress.id

    def progress(self, job_id: str) -> JobProgress:
        """A copy of the job's progress (KeyError for an unknown id)."""
        progress = self._job(job_id).progress
        return dataclasses.replace(progress, messages=list(progress.messages))

    def interrupt(self, job_id: str) -> JobProgress:
        """Ask the job to stop at the next step boundary; it saves its vectors as on the WebUI's Interrupt."""
        self._job(job_id).stop.set()
        return self.progress(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobProgress:
        self._job(job_id).finished.wait(timeout)
        return self.progress(job_id)

    def _job(self, job_id: str) -> _Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _run(self, job: _Job) -> None:
        progress = job.progress
        try:
            self.run_exclusive(lambda: self._train(job))
        except UserError as error:
            progress.status, progress.error = "failed", str(error)
        except Exception as error:  # the job thread is the last place to catch it: report, don't vanish
            progress.status, progress.error = "failed", f"{type(error).__name__}: {error}"
            progress.messages.append(traceback.format_exc())
        finally:
            job.finished.set()

    def _train(self, job: _Job) -> None:
        progress, services = job.progress, self.services
        if job.stop.is_set():
            progress.status = "interrupted"
            return
        progress.status = "running"

        def on_step(report: StepReport) -> None:
            progress.step, progress.end_step, progress.epoch = report.step, report.end_step, report.epoch
            progress.loss, progress.learn_rate = report.loss, report.learn_rate
            services.job_progress(report.step, report.end_step, f"Step {report.step}, loss {report.loss:.5f}")

        def on_message(text: str) -> None:
            progress.messages = (progress.messages + [text])[-KEEP_MESSAGES:]

        hooks = TrainingHooks(
            on_step=on_step,
            on_message=on_message,
            should_stop=lambda: job.stop.is_set() or services.interrupt_requested(),
            render_preview=services.render_preview,
            on_saved=lambda path: setattr(progress, "last_saved", str(path)),
            on_preview=lambda path: setattr(progress, "last_preview", str(path)),
            monitors=monitors_for(job.config, on_message),
        )
        try:
            result = train(job.config, services.get_backend(), hooks)
        finally:
            # Whatever was saved is usable at once: the host reloads its embeddings.
            services.refresh_embeddings()
        progress.status = "interrupted" if result.interrupted else "finished"
        progress.step = result.steps_done
        progress.embedding_path, progress.log_folder = str(result.embedding_path), str(result.log_folder)
        on_message(result.summary)
