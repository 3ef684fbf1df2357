"""modules.call_queue: one GPU job at a time (queue_lock), with shared.state begun and ended around it."""

import html
import threading

from modules import shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job="task")
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()

    return wrap_gradio_call(f, extra_outputs=extra_outputs)


def wrap_gradio_call(func, extra_outputs=None):
    """A handler's outputs as a tuple; an exception becomes `extra_outputs + [error HTML]`, not a raise."""

    def f(*args, **kwargs):
        try:
            outputs = list(func(*args, **kwargs))
        except Exception as error:
            shared.state.job = ""
            shared.state.job_count = 0
            message = f"{type(error).__name__}: {error}"
            outputs = list(extra_outputs or [None, ""]) + [f"<div class='error'>{html.escape(message)}</div>"]
        shared.state.skipped = False
        shared.state.interrupted = False
        shared.state.job_count = 0
        return tuple(outputs)

    return f
