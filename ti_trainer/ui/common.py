"""Small pieces the panels share: what is in the host's folders, and messages as HTML."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR, list_templates

if TYPE_CHECKING:
    from ti_trainer.host.base import HostServices

EMBEDDING_SUFFIXES = (".pt", ".safetensors")  # what training can start from (create.existing_embedding_file)
REFRESH_SYMBOL = "\U0001f504"  # 🔄, the WebUI's refresh button
# Never the symbol alone: where no emoji font is installed it is an empty box, and screen readers skip it.
REFRESH_LABEL = f"{REFRESH_SYMBOL} Refresh"


@dataclass
class PageLoad:
    """What a panel refreshes when a page opens: the tab wires it to its Blocks' `load` event."""

    fn: Callable
    inputs: list
    outputs: list


def embedding_names(services: HostServices) -> list[str]:
    """Embeddings directly in the host's embeddings folder, as the names written in prompts."""
    folder = Path(services.embeddings_dir)
    if not folder.is_dir():
        return []
    names = {p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES}
    return sorted(names, key=str.lower)


def template_names(services: HostServices) -> list[str]:
    return list(list_templates(*services.templates_dirs, BUILTIN_TEMPLATES_DIR))


def note(kind: str, text: str) -> str:
    """A one-paragraph message: kind is "ok", "warn", "error" or "info" (styled by style.css)."""
    return f'<p class="ti-trainer-note ti-trainer-{kind}">{html.escape(text)}</p>'


def notes(items: list[tuple[str, str]]) -> str:
    return "".join(note(kind, text) for kind, text in items)
