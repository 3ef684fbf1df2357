"""Atomic writes and user-supplied names kept inside their folders (DESIGN invariants 4 and 5)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ti_trainer.errors import UserError

# A1111 keeps letters, digits and "._- " in embedding names; we refuse anything else instead of silently
# renaming, so the name the artist types is the word they will write in prompts.
_NAME_ALLOWED = re.compile(r"^[A-Za-z0-9._ -]+$")
# A name becomes file names with suffixes (`<name>-<step>.pt.optim`, `<name>-compare-<stamp>.png`) and, while
# they are written, temporary names around those (`.<file>.<random>.tmp`). File systems allow 255 bytes per
# name (NAME_MAX); 100 ASCII characters leave room for every suffix, and a prompt word is never that long.
MAX_NAME_LENGTH = 100

# Errors of the disk rather than of the data: these get a message saying what to do instead of a traceback.
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # no EDQUOT on some systems
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}


def validate_embedding_name(name: str) -> str:
    """Return the name stripped of surrounding spaces, or raise UserError saying what to change."""
    cleaned = (name or "").strip()
    if not cleaned:
        raise UserError("The embedding needs a name: the word you will write in prompts, e.g. 'my-style'.")
    if "/" in cleaned or "\\" in cleaned:
        raise UserError(
            f"The embedding name {cleaned!r} contains a path separator ('/' or '\\'). "
            "Use a plain name such as 'my-style'; the file is always written into the embeddings folder."
        )
    if cleaned in (".", "..") or cleaned.startswith("."):
        raise UserError(f"The embedding name {cleaned!r} must not start with a dot. Use e.g. 'my-style'.")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise UserError(
            f"The embedding name {cleaned[:40]!r}... is {len(cleaned)} characters long; the most is "
            f"{MAX_NAME_LENGTH}, as the name becomes file names such as '<name>-500.pt.optim'. Use a shorter name."
        )
    if not _NAME_ALLOWED.match(cleaned):
        bad = sorted({c for c in cleaned if not _NAME_ALLOWED.match(c)})
        raise UserError(
            f"The embedding name {cleaned!r} contains {''.join(bad)!r}. "
            "Use letters, digits, spaces, '.', '_' and '-' only."
        )
    return cleaned


def confined_path(folder: Path, name: str, suffix: str) -> Path:
    """`folder/name+suffix`, refusing anything that would resolve outside `folder`."""
    folder = Path(folder)
    path = folder / f"{name}{suffix}"
    if os.path.commonpath([folder.resolve(), path.resolve()]) != str(folder.resolve()):
        raise UserError(f"{name!r} would be written outside {folder}. Use a plain name.")
    return path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so a crash leaves the previous good file.

    A full disk or a folder that cannot be written raises a UserError naming the file and what to do; the
    temporary file is removed and the previous `path` stays as it was.
    """
    path = Path(path)
    with explained_write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_temporary_file(path)
        try:
            mode = stat.S_IMODE(tmp_path.stat().st_mode)
            write(tmp_path)
            # Some writers (safetensors) replace the file with one of their own, created 0600: give the
            # result the mode the umask gave the file we created.
            if stat.S_IMODE(tmp_path.stat().st_mode) != mode:
                os.chmod(tmp_path, mode)
            os.replace(tmp_path, path)
        finally:
            with contextlib.suppress(OSError):  # the disk error itself is the one worth reporting
                tmp_path.unlink(missing_ok=True)
    return path


def _new_temporary_file(path: Path) -> Path:
    """An empty `.<name>.<random>.tmp` beside `path`, created with mode 0666 so that the umask decides the
    final file's permissions (as for any file the user creates); mkstemp's 0600 would hide outputs from the
    user's other accounts and services (a web server showing the previews, a shared embeddings folder)."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


@contextlib.contextmanager
def explained_write_errors(path: Path) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into a UserError saying what to do.

    Only errors that carry an errno (the operating system's) are translated: PIL and others raise OSError
    without one for problems in the data, which are not the disk's and keep their own message.
    """
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise
        raise write_error(Path(path), error) from error


def write_error(path: Path, error: OSError) -> UserError:
    """The message for an OSError met while writing `path`: what happened, which file, what to do."""
    reason = error.strerror or str(error)
    kept = " The previous file is kept as it was." if path.exists() else ""
    if error.errno in _DISK_FULL:
        advice = "The disk is full: free some space (or choose a folder on another disk) and try again."
    elif error.errno in _NOT_WRITABLE:
        advice = (
            f"The folder {path.parent} cannot be written (read-only, or no permission): choose a writable "
            "folder, or change its permissions, and try again."
        )
    else:
        advice = "Check the disk and the folder, then try again."
    return UserError(f"Could not write {path}: {reason}.{kept} {advice}")


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def require_folder(folder: Path, role: str) -> Path:
    """`folder` if it is an existing folder; otherwise a UserError naming the `role` ("dataset folder")."""
    folder = Path(folder)
    if not folder.exists():
        if folder.is_symlink():
            problem = _link_problem(folder)
            raise UserError(
                f"The {role} {folder} is {problem}. Give the folder that holds the images itself."
            )
        raise UserError(
            f"The {role} {folder} does not exist. Check the path (copy it from your file manager)."
        )
    if not folder.is_dir():
        raise UserError(
            f"The {role} {folder} is a file, not a folder. Give the folder that holds the images."
        )
    return folder


# Litter that file managers and OS tools leave beside images (and dot-files such as macOS's "._name.png"
# shadows): no verb uses them, and naming them as "skipped" would only be noise.
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})


@dataclass
class SkippedEntry:
    """One entry of a folder that no verb can use, with the reason in words an artist can act on."""

    path: Path
    reason: str


@dataclass
class FolderScan:
    """What is directly inside a folder: files that can be read, sub-folders, and entries that are neither."""

    files: list[Path] = field(default_factory=list)  # regular files (or links to them), by name
    folders: list[Path] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)  # FIFOs, devices, broken or looping links


def scan_folder(folder: Path, role: str, ignore: Path | None = None) -> FolderScan:
    """The one listing of a folder that every verb uses, so a special file is named the same way everywhere.

    Entries are classified from their own status, never by resolving paths: a symbolic link that loops or
    points nowhere, a named pipe (reading it would wait forever) or a device file becomes a skipped entry
    with its reason instead of an exception or a hang. `ignore` (a folder inside, e.g. the destination of
    a preparation) is left out. Raises UserError when `folder` itself is not a readable folder.
    """
    folder = require_folder(folder, role)
    ignored = _identity(ignore) if ignore is not None else None
    scan = FolderScan()
    for path in _entries(folder, role):
        if path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES:
            continue
        try:
            status = path.stat()
        except OSError as exc:
            scan.skipped.append(SkippedEntry(path, _unreadable_entry_reason(path, exc)))
            continue
        if stat.S_ISDIR(status.st_mode):
            if ignored is None or (status.st_dev, status.st_ino) != ignored:
                scan.folders.append(path)
        elif stat.S_ISREG(status.st_mode):
            scan.files.append(path)
        else:
            scan.skipped.append(SkippedEntry(path, _special_file_reason(status.st_mode)))
    return scan


def _entries(folder: Path, role: str) -> list[Path]:
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise UserError(
            f"The {role} {folder} cannot be listed ({exc.strerror or exc}). Check that you may read it."
        ) from exc


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = Path(path).stat()
    except OSError:  # not there yet (or unusable): nothing inside the folder can be it
        return None
    return status.st_dev, status.st_ino


def _unreadable_entry_reason(path: Path, exc: OSError) -> str:
    if path.is_symlink():
        return _link_problem(path)
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied)"
    return f"cannot be read ({exc.strerror or exc})"


def _link_problem(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"a symbolic link that loops (it leads back to itself through {target}); remove or fix it"
        if isinstance(exc, PermissionError):
            return f"a symbolic link to {target}, which cannot be read (permission denied)"
        return f"a broken symbolic link: it points to {target}, which does not exist; remove or fix it"
    return f"a symbolic link to {target}"


def _special_file_reason(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file: reading it would wait forever"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file, not an image"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    return "not a regular file"


def read_text_file(path: Path) -> str:
    """A hand-written text file (caption, template) decoded whatever editor saved it; never raises on decoding.

    UTF-8 (with or without BOM) and UTF-16 with BOM are recognised; anything else is read as Windows-1252
    (what Notepad calls "ANSI"), and failing that as Latin-1, which accepts every byte.
    """
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        return data.decode("utf-8-sig", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")
