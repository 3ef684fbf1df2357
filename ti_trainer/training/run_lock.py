"""One run at a time per embedding: a lock file beside it.

Two runs of the same embedding would append to one loss CSV and overwrite each other's step copies and the
embedding itself, and both would report success. A run holds `<name>.pt.lock` (A1111 does not read `.lock`
files) for its whole length. The file is created atomically (O_EXCL) and says who holds it: process id, host
and start time, so a refused run can name the first one. A lock left by a run that died (its process is gone,
on this host) is taken over with a message; a lock from another host cannot be checked and is left to the
user.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.fsutil import explained_write_errors


def lock_path(embedding_path: Path) -> Path:
    embedding_path = Path(embedding_path)
    return embedding_path.with_name(embedding_path.name + ".lock")


@contextlib.contextmanager
def embedding_lock(embedding_path: Path, on_message: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold the lock on `embedding_path` for the block; refuse with a UserError if another run holds it."""
    path = lock_path(embedding_path)
    _acquire(path, on_message)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):  # the run's own outcome matters more than a lock left behind
            path.unlink()


def _acquire(path: Path, on_message: Callable[[str], None]) -> None:
    if _create(path):
        return
    holder = _read(path)
    if holder is None or not _is_dead_here(holder):
        raise UserError(_held_message(path, holder))
    on_message(
        f"Taking over {path.name}: it was left by a run that is no longer running "
        f"(process {holder.get('pid')}, started {holder.get('started', 'at an unknown time')})."
    )
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if not _create(path):  # another run took it over in the same instant
        raise UserError(_held_message(path, _read(path)))


def _create(path: Path) -> bool:
    """Create the lock file holding our details; False if it exists already."""
    details = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    with explained_write_errors(path):
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(details, handle)
    return True


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_dead_here(holder: dict) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    return not _process_exists(holder["pid"])


def _process_exists(pid: int) -> bool:
    if os.name == "nt":
        return _windows_process_exists(pid)
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _windows_process_exists(pid: int) -> bool:
    # os.kill(pid, 0) on Windows would send Ctrl+C (signal 0 is CTRL_C_EVENT there), so ask the kernel.
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() != 87  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _held_message(path: Path, holder: dict | None) -> str:
    embedding = path.name.removesuffix(".lock")
    if holder is None:
        who = "another run (its lock file cannot be read)"
    else:
        where = "" if holder.get("host") == socket.gethostname() else f" on {holder.get('host')}"
        who = f"another run (process {holder.get('pid')}{where}, started {holder.get('started')})"
    return (
        f"{embedding} is being trained by {who}. Wait for it to finish, or stop it first; two runs on one "
        f"embedding would overwrite each other's files. If no such run is going, delete {path}."
    )
