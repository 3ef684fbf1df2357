"""Atomic writes and user-supplied names kept inside their folders (DESIGN invariants 4 and 5)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
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


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def require_folder(folder: Path, role: str) -> Path:
    """`folder` if it is an existing folder; otherwise a UserError naming the `role` ("dataset folder")."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(
            f"The {role} {folder} does not exist. Check the path (copy it from your file manager)."
        )
    if not folder.is_dir():
        raise UserError(
            f"The {role} {folder} is a file, not a folder. Give the folder that holds the images."
        )
    return folder


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
