"""Atomic writes and user-supplied names kept inside their folders (DESIGN invariants 4 and 5)."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ti_trainer.errors import UserError

# A1111 keeps letters, digits and "._- " in embedding names; we refuse anything else instead of silently
# renaming, so the name the artist types is the word they will write in prompts.
_NAME_ALLOWED = re.compile(r"^[A-Za-z0-9._ -]+$")


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
    """Call `write(tmp_path)` then rename onto `path`, so a crash leaves the previous good file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


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
