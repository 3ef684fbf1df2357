"""What is in a folder of images: image files in name order, and everything else with the reason it is unused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.fsutil import require_folder
from ti_trainer.images import IMAGE_SUFFIXES, ImageProblem, is_image_file

# Litter that file managers and OS tools leave beside images; naming it as "skipped" would only be noise.
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})


@dataclass
class FolderListing:
    images: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    unused: list[ImageProblem] = field(default_factory=list)


def list_folder(folder: Path, role: str = "image folder", ignore: Path | None = None) -> FolderListing:
    """Files directly inside `folder`, sorted by name; `ignore` (e.g. a destination inside it) is left out.

    Raises UserError when the folder is missing or is a file; an empty listing is for the caller to judge.
    """
    folder = require_folder(folder, role)
    ignored = ignore.resolve() if ignore is not None else None
    listing = FolderListing()
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        if path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES:
            continue
        if ignored is not None and path.resolve() == ignored:
            continue
        if path.is_dir():
            listing.unused.append(ImageProblem(path, "a folder: images inside sub-folders are not used"))
        elif is_image_file(path):
            listing.images.append(path)
        elif path.suffix.lower() == ".txt":
            listing.captions.append(path)
        else:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            listing.unused.append(
                ImageProblem(path, f"not an image type that can be used ({kinds}); export it as PNG or JPEG")
            )
    return listing


def require_images(listing: FolderListing, folder: Path, role: str = "image folder") -> list[Path]:
    if listing.images:
        return listing.images
    unused = "".join(f"\n  {p.path.name}: {p.reason}" for p in listing.unused[:10])
    raise UserError(f"The {role} {folder} holds no image files.{unused}")
