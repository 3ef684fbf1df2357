"""What A1111 and Forge share as hosts: long jobs the WebUI's way (its queue lock, `shared.state`, its
progress bar's task id), its BLIP captioner, its folders and flags, and so the host services built from them.

Both WebUIs keep A1111's `shared`, `call_queue`, `progress` and command-line flags, so one description serves
both; each host hands in its WebUI's modules (only host/a1111.py and host/forge.py import them) and what is
its own: the backend over its model, previews, and how its embedding database is refreshed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from PIL import Image

from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.host import api, webui_settings
from ti_trainer.host.base import HostServices
from ti_trainer.host.jobs import JobRegistry
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR

TAB_TITLE = "TI Trainer"  # not "Train": that is A1111's own tab, which may or may not be there
TAB_ID = "ti_trainer"


class WebuiHost:
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

    def host_services(
        self,
        name: str,
        get_backend: Callable,
        render_preview: Callable,
        refresh_embeddings: Callable[[], None],
        caption_with_deepbooru: Callable[[Image.Image], str],
    ) -> HostServices:
        """The services of a WebUI host named `name`: the WebUI's embeddings and templates folders (Forge
        removed its templates folder but kept the flag: a folder the user made is still read), our log folder
        from the Settings page, its models folder, its jobs, progress bar, Interrupt and captioners."""
        shared = self.shared
        return HostServices(
            name=name,
            embeddings_dir=Path(shared.cmd_opts.embeddings_dir),
            templates_dirs=[Path(shared.cmd_opts.textual_inversion_templates_dir), BUILTIN_TEMPLATES_DIR],
            log_dir=Path(shared.data_path, webui_settings.setting(shared, "log_dir")),
            models_dir=Path(shared.models_path),
            get_backend=get_backend,
            render_preview=render_preview,
            refresh_embeddings=refresh_embeddings,
            captioners={"BLIP (WebUI)": self.caption_with_blip, "deepbooru": caption_with_deepbooru},
            defaults=webui_settings.SettingsDefaults(shared),
            wrap_job=self.wrap_job,
            job_progress=self.report_progress,
            interrupt_requested=lambda: bool(shared.state.interrupted),
            request_interrupt=lambda: shared.state.interrupt(),
        )

    def txt2img_preview(
        self, processing: ModuleType, model, request: PreviewRequest, **extra
    ) -> Image.Image | None:
        """One preview image through the WebUI's own txt2img (`processing`), saving nothing; None when
        Interrupt stopped it while sampling. `extra`: the WebUI's own further processing options."""
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=model,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            steps=request.steps,
            sampler_name=request.sampler,
            cfg_scale=request.cfg_scale,
            seed=request.seed,
            width=request.width,
            height=request.height,
            do_not_save_grid=True,
            do_not_save_samples=True,
            **extra,
        )
        processed = processing.process_images(p)
        if not processed.images:
            return None
        image = processed.images[0]
        self.shared.state.assign_current_image(image)
        return image

    def ui_tabs(self, services: HostServices) -> list[tuple[object, str, str]]:
        """Our tab, for the WebUI's `on_ui_tabs` callback."""
        from ti_trainer.ui.tab import build_tab  # Gradio panels load only when the WebUI builds its UI

        return [(build_tab(services), TAB_TITLE, TAB_ID)]

    def add_api_routes(self, app, host_services: Callable[[], HostServices]) -> None:
        """Our routes where the WebUI serves its own API, guarded by the same credentials (--api-auth).

        The WebUI adds its API only with --api, or with --nowebui (API only); otherwise `/sdapi/v1/*` answers
        404, and so must ours: a WebUI behind --gradio-auth alone guards its pages, not routes added here.
        """
        if not self.serves_api():
            return
        services = host_services()
        jobs = JobRegistry(services, run_exclusive=self.run_exclusive)
        api.add_routes(app, services, jobs, api.parse_credentials(self.shared.cmd_opts.api_auth))

    def serves_api(self) -> bool:
        """Whether the WebUI registered its own API routes (webui.py: `--api`, or `--nowebui`): ours go
        exactly there, so a WebUI behind --gradio-auth alone, whose `/sdapi/v1/*` answers 404, has none."""
        flags = self.shared.cmd_opts
        return bool(getattr(flags, "api", False) or getattr(flags, "nowebui", False))
