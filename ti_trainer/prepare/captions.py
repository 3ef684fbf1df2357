"""Caption files beside prepared images: read, combine with a new caption, save one, find and replace in all.

A caption lives in `<image stem>.txt`, UTF-8, as A1111's trainer reads it. Every save is atomic, so an editor
crash never leaves half a caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write_text, read_text_file
from ti_trainer.images import ImageProblem, caption_for
from ti_trainer.prepare.listing import list_folder, require_images

# What to do with a caption file that already exists, as A1111's setting "existing caption action".
EXISTING_CAPTION_ACTIONS = ("ignore", "keep", "prepend", "append")


@dataclass
class CaptionEntry:
    image: Path
    caption: str  # what training will use: the .txt, or words from the file name when there is none
    has_file: bool


@dataclass
class CaptionListing:
    entries: list[CaptionEntry]
    skipped: list[ImageProblem]  # entries of the folder that are not images (pipes, broken links, folders...)


@dataclass
class ReplaceResult:
    changed: list[Path] = field(default_factory=list)  # caption files rewritten
    replacements: int = 0


def combine_captions(existing: str | None, new: str, action: str) -> str:
    """A1111's rule: ignore = the new caption; keep = the old one if any; prepend = "old new"; append = "new old"."""
    if action not in EXISTING_CAPTION_ACTIONS:
        raise UserError(
            f"Unknown action for existing captions {action!r}; choose one of {', '.join(EXISTING_CAPTION_ACTIONS)}."
        )
    existing = (existing or "").strip()
    new = (new or "").strip()
    if action == "ignore" or not existing:
        return new
    if action == "keep" or not new:
        return existing
    return f"{existing} {new}" if action == "prepend" else f"{new} {existing}"


def caption_file(image: Path) -> Path:
    return Path(image).with_suffix(".txt")


def read_caption(image: Path) -> str | None:
    """The text of the image's caption file, whatever encoding an editor saved it in; None when there is none."""
    path = caption_file(image)
    if not path.is_file():
        return None
    try:
        return read_text_file(path).strip()
    except OSError as exc:
        raise UserError(f"The caption file {path} could not be read ({exc.strerror or exc}).") from exc


def save_caption(folder: Path, image_name: str, text: str) -> Path:
    """Write the caption of `image_name` in `folder`; the name must be a plain file name inside that folder."""
    folder = Path(folder)
    if Path(image_name).name != image_name or image_name in ("", ".", ".."):
        raise UserError(
            f"{image_name!r} is not a file name inside {folder}; captions are saved beside images."
        )
    image = folder / image_name
    if not image.is_file():
        raise UserError(
            f"The image {image} no longer exists, so its caption was not saved. Reload the folder."
        )
    return atomic_write_text(caption_file(image), _one_caption(text))


def _one_caption(text: str) -> str:
    # A1111 reads the whole file; a stray trailing newline from an editor would end up in every prompt.
    return (text or "").strip()


def dataset_captions(folder: Path) -> list[CaptionEntry]:
    """Every image in `folder` with the caption training will use for it."""
    return caption_listing(folder).entries


def caption_listing(folder: Path) -> CaptionListing:
    """Every image in `folder` with its caption, and what else the folder holds that is not used."""
    folder = Path(folder)
    listing = list_folder(folder, "dataset folder")
    images = require_images(listing, folder, "dataset folder")
    entries = []
    for image in images:
        text = read_caption(image)
        entries.append(
            CaptionEntry(image, text if text is not None else caption_for(image), text is not None)
        )
    return CaptionListing(entries, listing.unused)


def find_and_replace(
    folder: Path,
    find: str,
    replace: str,
    *,
    regex: bool = False,
    match_case: bool = False,
    whole_words: bool = False,
) -> ReplaceResult:
    """Replace `find` in every caption file of `folder`; only files whose text changes are rewritten."""
    pattern = _search_pattern(find, regex, match_case, whole_words)
    result = ReplaceResult()
    for entry in dataset_captions(folder):
        if not entry.has_file:
            continue
        try:
            updated, count = pattern.subn(replace, entry.caption)
        except (re.error, IndexError) as exc:  # e.g. "\2" in the replacement with one group
            raise UserError(f"The replacement {replace!r} does not fit the pattern {find!r}: {exc}.") from exc
        updated = _tidy(updated) if count else updated
        if count and updated != entry.caption:
            atomic_write_text(caption_file(entry.image), _one_caption(updated))
            result.changed.append(caption_file(entry.image))
            result.replacements += count
    return result


def _tidy(text: str) -> str:
    """Removing a word or tag should not leave double spaces or an empty ", ," tag behind."""
    text = " ".join(text.split())
    text = re.sub(r"\s*,(?:\s*,)+", ",", text)
    return text.strip(" ,")


def _search_pattern(find: str, regex: bool, match_case: bool, whole_words: bool) -> re.Pattern[str]:
    if not find:
        raise UserError("Type the text to find; an empty search would match everywhere.")
    body = find if regex else re.escape(find)
    if whole_words:
        body = rf"\b(?:{body})\b"
    try:
        return re.compile(body, 0 if match_case else re.IGNORECASE)
    except re.error as exc:
        raise UserError(
            f"{find!r} is not a valid regular expression ({exc}). Untick 'regex' to search plain text."
        ) from exc
