"""What is in a folder of images: image files in name order, and everything else with the reason it is unused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.fsutil import scan_folder
from ti_trainer.images import IMAGE_SUFFIXES, ImageProblem, is_image_file


@dataclass
class FolderListing:
    images: list[Path] = field(default_factory=list)
    captions: list[Path] = field(default_factory=list)
    unused: list[ImageProblem] = field(default_factory=list)


def list_folder(folder: Path, role: str = "image folder", ignore: Path | None = None) -> FolderListing:
    """Files directly inside `folder`, sorted by name; `ignore` (e.g. a destination inside it) is left out.

    Raises UserError when the folder is missing or is a file; an empty listing is for the caller to judge.
    Sub-folders, other file types and special entries (pipes, devices, broken or looping links) are `unused`.
    """
    scan = scan_folder(folder, role, ignore)
    listing = FolderListing(unused=[ImageProblem(entry.path, entry.reason) for entry in scan.skipped])
    listing.unused += [
        ImageProblem(path, "a folder: images inside sub-folders are not used") for path in scan.folders
    ]
    for path in scan.files:
        if is_image_file(path):
            listing.images.append(path)
        elif path.suffix.lower() == ".txt":
            listing.captions.append(path)
        else:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            listing.unused.append(
                ImageProblem(path, f"not an image type that can be used ({kinds}); export it as PNG or JPEG")
            )
    listing.unused.sort(key=lambda problem: problem.path.name)
    return listing


def require_images(listing: FolderListing, folder: Path, role: str = "image folder") -> list[Path]:
    if listing.images:
        return listing.images
    unused = "".join(f"\n  {p.path.name}: {p.reason}" for p in listing.unused[:10])
    raise UserError(f"The {role} {folder} holds no image files.{unused}")
