"""modules.call_queue (Forge: modules/call_queue.py): one GPU job at a time (`queue_lock`, a FIFOLock in Forge),
and `wrap_gradio_gpu_call` with the progress bar's task ids, as A1111's."""

import html
import threading
from functools import wraps

from modules import progress, shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        task = args[0] if args and isinstance(args[0], str) and args[0].startswith("task(") else None
        if task:
            progress.add_task_to_queue(task)
        with queue_lock:
            shared.state.begin(job=task)
            progress.start_task(task)
            try:
                return func(*args, **kwargs)
            finally:
                progress.finish_task(task)
                shared.state.end()

    return wrap_gradio_call(f, extra_outputs=extra_outputs)


def wrap_gradio_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        try:
            outputs = list(func(*args, **kwargs))
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
            outputs = list(extra_outputs or [None, ""]) + [f"<div class='error'>{html.escape(message)}</div>"]
        shared.state.skipped = False
        shared.state.interrupted = False
        shared.state.job_count = 0
        return tuple(outputs)

    return f
