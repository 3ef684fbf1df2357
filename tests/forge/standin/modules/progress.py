"""modules.progress: the task ids the WebUI's progress bar polls (/internal/progress) while a job runs."""

queued_tasks: list[str] = []
current_task: str | None = None
finished_tasks: list[str] = []


def add_task_to_queue(id_job):
    queued_tasks.append(id_job)


def start_task(id_task):
    global current_task
    current_task = id_task
    if id_task in queued_tasks:
        queued_tasks.remove(id_task)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
