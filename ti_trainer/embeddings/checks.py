"""Checks an embedding's vectors must pass before they are used or written.

Two ways a file can be wrong for the run at hand: its values are not numbers (NaN or inf, from a run that
diverged or a damaged download), or its vectors are as wide as another model's text encoder (an SD 1.x file
offered to SD 2.x). Both are refused with a message naming the file, wherever a file is read, used with a
model or written, so no caller can pass them on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ti_trainer.errors import UserError

# The text-encoder widths of the model families users meet; other widths (the tests' tiny models) get no name.
_FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 2048: "SDXL"}


def family_of(width: int) -> str | None:
    """The model family whose text encoder has vectors `width` wide, if it is a well-known one."""
    return _FAMILY_BY_WIDTH.get(int(width))


def require_width(
    source: Path | str,
    width: int,
    needed: int,
    needed_by: str = "the loaded model needs",
    advice: str = "Use an embedding made for this model.",
) -> None:
    """Refuse vectors `width` wide from the file `source` where `needed`-wide ones are needed.

    The message reads e.g. "x.pt holds 768-wide vectors (an SD 1.x embedding); the loaded model needs 1024
    (SD 2.x). Use an embedding made for this model."
    """
    if int(width) == int(needed):
        return
    family, needed_family = family_of(width), family_of(needed)
    held = f"{width}-wide vectors" + (f" (an {family} embedding)" if family else "")
    wanted = f"{needed}" + (f" ({needed_family})" if needed_family else "")
    raise UserError(f"{Path(source).name} holds {held}; {needed_by} {wanted}. {advice} File: {source}")


def require_fits(
    source: Path | str,
    vectors: torch.Tensor | dict[str, torch.Tensor],
    family,
    advice: str = "Use an embedding made for this model.",
) -> None:
    """Refuse vectors from the file `source` that the model family `family` (backends/contract.py
    `ModelFamily`) cannot take: one tensor where it has one text encoder (checked by width, as A1111 does), or
    one tensor per encoder, keyed and as wide as its encoders (SDXL's `clip_l`, `clip_g`)."""
    name = Path(source).name
    if not family.vectors_per_encoder:
        if isinstance(vectors, torch.Tensor):
            require_width(source, int(vectors.shape[-1]), family.text_width, advice=advice)
            return
        held = ", ".join(f"{key} {int(tensor.shape[-1])}" for key, tensor in vectors.items())
        raise UserError(
            f"{name} is an SDXL embedding (one set of vectors per text encoder: {held}); the loaded model is "
            f"{family.title}, with one text encoder of width {family.text_width}. {advice} File: {source}"
        )
    wanted = ", ".join(f"{spec.key} {spec.width}" for spec in family.text_encoders)
    if isinstance(vectors, torch.Tensor):
        width = int(vectors.shape[-1])
        known = family_of(width)
        held = f"one set of {width}-wide vectors" + (f" (an {known} embedding)" if known else "")
        raise UserError(
            f"{name} holds {held}; the loaded model is {family.title}, whose embeddings hold vectors for each of "
            f"its text encoders ({wanted}). {advice} File: {source}"
        )
    held_widths = {key: int(tensor.shape[-1]) for key, tensor in vectors.items()}
    needed = {spec.key: spec.width for spec in family.text_encoders}
    if held_widths != needed:
        held = ", ".join(f"{key} {width}" for key, width in held_widths.items())
        raise UserError(
            f"{name} holds vectors of widths {held}; the loaded model needs {wanted}. {advice} File: {source}"
        )


def has_non_finite(vectors: torch.Tensor) -> bool:
    return not bool(torch.isfinite(vectors.detach()).all())


def require_finite_on_load(vectors: torch.Tensor, source: Path | str) -> None:
    """Refuse a file whose vectors hold NaN or inf: training it skips every step, and previews are noise."""
    if has_non_finite(vectors):
        raise UserError(
            f"{source} holds NaN or infinite values in its vectors: it is damaged (from a run that diverged, "
            "or an incomplete download). Delete it and create the embedding again, or use an earlier saved "
            "copy from its training run (Results tab, 'use this step')."
        )


def require_finite_on_save(vectors: torch.Tensor, target: Path | str) -> None:
    """Refuse to write vectors holding NaN or inf: such a file would replace a good one and load as noise."""
    if has_non_finite(vectors):
        raise UserError(
            f"Not writing {target}: its vectors hold NaN or infinite values. The previous file is kept as it "
            "was. Lower the learning rate or train in fp32/bf16, and start again from an earlier saved copy."
        )


def tensors_in(data: object) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists (an embedding's dict as it is written into a file or image)."""
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, dict):
        return [tensor for value in data.values() for tensor in tensors_in(value)]
    if isinstance(data, (list, tuple)):
        return [tensor for value in data for tensor in tensors_in(value)]
    return []
