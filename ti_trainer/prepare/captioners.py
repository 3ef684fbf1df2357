"""The captioners an artist can pick: our BLIP, plus those the host already has (A1111's BLIP, deepbooru)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ti_trainer.errors import UserError
from ti_trainer.prepare.blip import DEFAULT_BLIP_MODEL, load_blip_captioner

BLIP_LABEL = "BLIP (transformers)"

Captioner = Callable[[Image.Image], str]


def captioner_labels(host_captioners: dict[str, Captioner]) -> list[str]:
    return [BLIP_LABEL, *host_captioners]


class CombinedCaptioner:
    """Runs each chosen captioner and joins their non-empty captions with ", " (as A1111 does)."""

    def __init__(self, parts: list[Captioner]):
        self.parts = parts

    def __call__(self, image: Image.Image) -> str:
        return ", ".join(text for text in (part(image).strip() for part in self.parts) if text)

    def close(self) -> None:
        """Free the models this run loaded (the host's own captioners are the host's to keep)."""
        for part in self.parts:
            if hasattr(part, "close"):
                part.close()


def build_captioner(
    labels: list[str],
    host_captioners: dict[str, Captioner],
    blip_model: str = DEFAULT_BLIP_MODEL,
    models_dir: Path | None = None,
    on_message: Callable[[str], None] = print,
) -> CombinedCaptioner | None:
    """The captioners chosen by label, or None when none is.

    Models load here, before any image is processed, so a missing model fails fast.
    """
    parts: list[Captioner] = []
    for label in labels:
        if label == BLIP_LABEL:
            parts.append(load_blip_captioner(blip_model, models_dir, on_message=on_message))
        elif label in host_captioners:
            parts.append(host_captioners[label])
        else:
            known = ", ".join(captioner_labels(host_captioners))
            raise UserError(f"There is no captioner called {label!r} here; choose from: {known}.")
    return CombinedCaptioner(parts) if parts else None
