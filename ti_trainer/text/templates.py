"""Prompt template files: one prompt pattern per line, with `[name]` and `[filewords]` placeholders.

`[name]` is where the embedding goes; a line without it builds a prompt the embedding is absent from, so that
step teaches it nothing (and a step of such prompts alone has no gradient at all). Such lines are left out with
a warning naming them; a template with no line left, or a file that is not text, is refused here, before any
GPU time is spent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.fsutil import read_text_file

BUILTIN_TEMPLATES_DIR = Path(__file__).parent / "templates"

NAME_PLACEHOLDER = "[name]"
FILEWORDS_PLACEHOLDER = "[filewords]"

# Bracketed words an artist most likely meant as a placeholder. Other brackets are left alone: in A1111
# prompts `[word]` is ordinary de-emphasis syntax.
_NEAR_MISSES = {"name", "names", "filewords", "fileword", "filename", "filenames", "words"}
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")
# Control characters no text editor writes (tab, newlines and form feed excepted): a sign of a binary file.
_BINARY = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


@dataclass
class Template:
    path: Path
    lines: list[str]
    warnings: list[str]


def list_templates(*folders: Path) -> dict[str, Path]:
    """Template file name -> path for every `*.txt` under `folders` (recursively), sorted by name.

    On a name clash the earlier folder wins, and within one folder the shallower file; missing folders are
    skipped. With no folders, the templates shipped with ti_trainer are listed.
    """
    found: dict[str, Path] = {}
    for folder in folders or (BUILTIN_TEMPLATES_DIR,):
        folder = Path(folder)
        if not folder.is_dir():
            continue
        candidates = sorted(folder.rglob("*.txt"), key=lambda p: (len(p.relative_to(folder).parts), str(p)))
        for path in candidates:
            if path.is_file():
                found.setdefault(path.name, path)
    return dict(sorted(found.items()))


def read_template(path: Path) -> Template:
    """The lines of a template file that hold [name]; UserError when it cannot teach the embedding anything.

    Blank lines are dropped: A1111 keeps them as empty prompts, which train nothing. Lines without [name] are
    dropped too, with a warning giving their line numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"The prompt template {path} does not exist. Pick one of the listed templates, "
            "e.g. style_filewords.txt, or save your own .txt file in the templates folder."
        )
    text = read_text_file(path)
    if _BINARY.search(text):
        raise UserError(
            f"The prompt template {path} is not a text file (it holds binary data). A template is a plain .txt "
            "file with one prompt per line, each with [name] where the embedding goes, e.g. '[filewords], [name]'."
        )
    lines = [line.strip() for line in text.splitlines()]
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line]
    if not numbered:
        raise UserError(
            f"The prompt template {path} is empty. Write one prompt per line, each with [name] where the "
            "embedding goes, e.g. '[filewords], [name]', or pick style_filewords.txt."
        )
    without_name = [number for number, line in numbered if NAME_PLACEHOLDER not in line]
    near_misses = _near_miss_warnings(path, numbered)
    if len(without_name) == len(numbered):
        hint = f" ({' '.join(near_misses)})" if near_misses else ""
        raise UserError(
            f"No line of the prompt template {path} contains [name]{hint}. The embedding would never appear in a "
            "training prompt, so nothing would be learned. Put [name] where the embedding goes, e.g. "
            "'[filewords], [name]', or pick a template such as style_filewords.txt or subject_filewords.txt."
        )
    warnings = list(near_misses)
    if without_name:
        listed = ", ".join(str(number) for number in without_name)
        warnings.append(
            f"Line{'s' if len(without_name) > 1 else ''} {listed} of the prompt template {path} "
            f"lack{'s' * (len(without_name) == 1)} [name] and {'are' if len(without_name) > 1 else 'is'} left "
            "out: a prompt without the embedding teaches it nothing. Add [name] to use them, or delete them."
        )
    kept = [line for number, line in numbered if number not in without_name]
    return Template(path=path, lines=kept, warnings=warnings)


def _near_miss_warnings(path: Path, numbered: list[tuple[int, str]]) -> list[str]:
    """Placeholders mistyped ("[Name]", "[file words]"), which A1111 would leave in the prompt as text."""
    warnings = []
    for number, line in numbered:
        for inner in _BRACKETED.findall(line):
            normalized = re.sub(r"[\s_-]", "", inner.lower())
            if normalized in _NEAR_MISSES and f"[{inner}]" not in (NAME_PLACEHOLDER, FILEWORDS_PLACEHOLDER):
                meant = NAME_PLACEHOLDER if normalized.startswith("name") else FILEWORDS_PLACEHOLDER
                warnings.append(
                    f"Line {number} of {path.name}: [{inner}] is not a placeholder and stays in the prompt "
                    f"as text; did you mean {meant}?"
                )
    return warnings
