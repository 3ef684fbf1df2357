"""Source folder -> destination folder of training images (and captions), leaving the source untouched.

Per source image: load it (bad files are skipped with their reason), cut it to the output size by centre,
focal point or kept aspect ratio (or into overlapping tiles when it is much longer than wide), add mirrored
copies, caption it, and write `{index:05}-{n}-{stem}.png` + `.txt` as A1111's preprocessor named them (its
trainer strips that prefix when it falls back to file-name captions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write, atomic_write_text
from ti_trainer.images import ImageLoadError, ImageProblem, load_image
from ti_trainer.prepare.captions import EXISTING_CAPTION_ACTIONS, caption_file, combine_captions, read_caption
from ti_trainer.prepare.focal import FocalWeights, find_focal_point
from ti_trainer.prepare.geometry import (
    FLIPS,
    bucket_size,
    cover_and_crop,
    cover_scale,
    flipped_copies,
    needs_split,
    split_into_tiles,
)
from ti_trainer.prepare.listing import list_folder, require_images

CROP_MODES = ("center", "focal", "keep")
# Below this a source has too few pixels to teach anything; it would be a smear at any training size.
MIN_SOURCE_SIDE = 64
# Enlarging by less than this is invisible; above it the seed's warning applies ("you will get blurry imagery").
_BLUR_SCALE = 1.01

ProgressCallback = Callable[[int, int, str], None]  # (sources done, sources in all, current file name)


@dataclass
class PrepareOptions:
    size: int = 512
    crop: str = "center"  # center | focal | keep (aspect ratio kept, for bucketed training)
    focal: FocalWeights = field(default_factory=FocalWeights)
    split: bool = False
    split_threshold: float = 0.5
    split_overlap: float = 0.2
    flips: tuple[str, ...] = ()
    # Differs from A1111's default "ignore": a hand-written caption in the source is the artist's work.
    existing_caption: str = "keep"

    def validate(self) -> None:
        if not 64 <= self.size <= 4096 or self.size % 8:
            raise UserError(
                f"The output size must be a multiple of 8 between 64 and 4096 px (512, 768...), not {self.size}."
            )
        if self.crop not in CROP_MODES:
            raise UserError(f"Unknown crop {self.crop!r}; choose one of {', '.join(CROP_MODES)}.")
        if not 0.0 < self.split_threshold <= 1.0:
            raise UserError(f"The split threshold must be above 0 and at most 1, not {self.split_threshold}.")
        if not 0.0 <= self.split_overlap < 1.0:
            raise UserError(
                f"The split overlap must be from 0 up to (not including) 1, not {self.split_overlap}."
            )
        unknown = [flip for flip in self.flips if flip not in FLIPS]
        if unknown:
            raise UserError(f"Unknown flip {unknown[0]!r}; choose from {', '.join(FLIPS)}.")
        if self.existing_caption not in EXISTING_CAPTION_ACTIONS:
            raise UserError(
                f"Unknown existing-caption action {self.existing_caption!r}; "
                f"choose one of {', '.join(EXISTING_CAPTION_ACTIONS)}."
            )


@dataclass
class PrepareResult:
    written: list[Path] = field(default_factory=list)  # images written (captions sit beside them)
    skipped: list[ImageProblem] = field(default_factory=list)  # source files not used, with the reason
    flagged: list[ImageProblem] = field(default_factory=list)  # used, but worth a look (blurry, no caption)
    notes: list[str] = field(default_factory=list)
    sources_done: int = 0
    sources_total: int = 0
    interrupted: bool = False

    def summary(self) -> str:
        status = "Interrupted" if self.interrupted else "Done"
        return (
            f"{status}: {self.sources_done} of {self.sources_total} source images processed, "
            f"{_count(len(self.written), 'image')} written, {_count(len(self.skipped), 'file')} skipped, "
            f"{len(self.flagged)} flagged."
        )

    def lines(self) -> list[str]:
        """The summary, then every skipped and flagged file by name: what the CLI prints and the panel shows."""
        lines = [self.summary()]
        lines += [f"skipped {problem.path.name}: {problem.reason}" for problem in self.skipped]
        lines += [f"flagged {problem.path.name}: {problem.reason}" for problem in self.flagged]
        return lines + self.notes


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def prepare_dataset(
    source: Path,
    dest: Path,
    options: PrepareOptions,
    captioner: Callable[[Image.Image], str] | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PrepareResult:
    """Write the prepared dataset of `source` into `dest`; the source folder is only read."""
    options.validate()
    source, dest = Path(source), Path(dest)
    _check_folders(source, dest)
    listing = list_folder(source, "source folder", ignore=dest)
    images = require_images(listing, source, "source folder")
    dest.mkdir(parents=True, exist_ok=True)
    already_there = {p.name for p in dest.iterdir() if p.is_file()}
    result = PrepareResult(skipped=list(listing.unused), sources_total=len(images))
    captioning = _Captioning(captioner)
    for index, path in enumerate(images):
        if should_stop is not None and should_stop():
            result.interrupted = True
            break
        if progress is not None:
            progress(index, len(images), path.name)
        _prepare_one_or_skip(path, index, dest, options, captioning, result)
        result.sources_done += 1
    if progress is not None:
        progress(result.sources_done, len(images), "")
    stale = already_there - {p.name for p in result.written} - {caption_file(p).name for p in result.written}
    if stale:
        result.notes.append(
            f"{dest} already held {len(stale)} other files (earlier runs?); they were left as they are, "
            "and training will use them too. Move them away if they are not wanted."
        )
    return result


def _check_folders(source: Path, dest: Path) -> None:
    if dest.is_symlink() and not dest.exists():  # checked first: resolving a looping link raises
        raise UserError(
            f"The destination {dest} is a symbolic link that leads nowhere (broken, or looping back to "
            "itself). Remove it or give another folder for the prepared images."
        )
    if dest.exists() and not dest.is_dir():
        raise UserError(f"The destination {dest} is a file; give a folder for the prepared images.")
    if source.exists() and dest.exists() and source.resolve() == dest.resolve():
        raise UserError(
            f"The destination is the source folder {source}. Source images are never overwritten: "
            "give another folder, e.g. a 'prepared' folder inside it."
        )


def _prepare_one_or_skip(
    path: Path,
    index: int,
    dest: Path,
    options: PrepareOptions,
    captioning: _Captioning,
    result: PrepareResult,
) -> None:
    """Prepare one source; whatever goes wrong with it is reported by name, and the folder goes on.

    A UserError (e.g. OpenCV missing for the focal crop) is about the setup, not this image: it would fail
    for every image, so it stops the run with its message. Outputs already written stay.
    """
    try:
        _prepare_one(path, index, dest, options, captioning, result)
    except ImageLoadError as exc:  # a UserError too, but about this one file
        result.skipped.append(ImageProblem(path, exc.reason))
    except UserError:
        raise
    except Exception as exc:  # a bug or a Pillow limit for this one image must not cost the rest
        result.skipped.append(ImageProblem(path, f"could not be prepared ({type(exc).__name__}: {exc})"))


def _prepare_one(
    path: Path,
    index: int,
    dest: Path,
    options: PrepareOptions,
    captioning: _Captioning,
    result: PrepareResult,
) -> None:
    image = load_image(path)
    if min(image.size) < MIN_SOURCE_SIDE:
        result.skipped.append(
            ImageProblem(
                path,
                f"too small ({image.width}x{image.height} px); at least {MIN_SOURCE_SIDE} px a side is needed, "
                f"{options.size} px for a sharp result",
            )
        )
        return
    pieces, scale = _cut(image, options)
    if scale > _BLUR_SCALE:
        result.flagged.append(
            ImageProblem(
                path,
                f"smaller than the output ({image.width}x{image.height} px, enlarged {scale:.1f}x): "
                "it will look blurry; use a larger source if you have one",
            )
        )
    existing = _existing_caption(path, result)
    outputs = 0
    for piece in pieces:
        caption = combine_captions(
            existing, captioning.caption(piece, path, result), options.existing_caption
        )
        for variant in [piece, *flipped_copies(piece, options.flips)]:
            target = dest / f"{index:05}-{outputs}-{path.stem}.png"
            _write_png(target, variant)
            if caption or captioning.active:
                atomic_write_text(caption_file(target), caption)
            result.written.append(target)
            outputs += 1


def _cut(image: Image.Image, options: PrepareOptions) -> tuple[list[Image.Image], float]:
    """The output pieces of one source image and how much it was enlarged (1.0: not at all)."""
    size = options.size
    if options.split and needs_split(image.size, size, options.split_threshold):
        return split_into_tiles(image, size, options.split_overlap), size / min(image.size)
    if options.crop == "keep":
        target = bucket_size(image.size, size)
        return [cover_and_crop(image, target)], cover_scale(image.size, target)
    focus = (0.5, 0.5)
    if options.crop == "focal":
        point = find_focal_point(image, options.focal)
        focus = (point.x, point.y)
    return [cover_and_crop(image, (size, size), focus)], cover_scale(image.size, (size, size))


def _existing_caption(path: Path, result: PrepareResult) -> str | None:
    try:
        return read_caption(path)
    except UserError as error:  # an unreadable caption should not cost the artist the image
        result.flagged.append(ImageProblem(path, str(error)))
        return None


class _Captioning:
    """The run's captioner, until it says it cannot caption at all (a UserError: its model is gone, out of
    memory...). Then captioning stops for the rest of the run, and the images are still cropped and written:
    hours of cropping are not thrown away for captions that can be written by hand afterwards."""

    def __init__(self, captioner: Callable[[Image.Image], str] | None):
        self.captioner = captioner

    @property
    def active(self) -> bool:
        return self.captioner is not None

    def caption(self, image: Image.Image, path: Path, result: PrepareResult) -> str:
        if self.captioner is None:
            return ""
        try:
            return self.captioner(image)
        except UserError as error:
            self.captioner = None
            result.notes.append(
                f"Captioning stopped at {path.name}: {error} The images were still prepared; captions were "
                "written up to that image. Write the rest by hand in the caption editor (Prepare tab), or "
                "run the preparation again with a captioning model that works (a local model folder)."
            )
            return ""
        except Exception as exc:  # one image the captioner chokes on should not stop the whole run
            result.flagged.append(ImageProblem(path, f"captioning failed ({type(exc).__name__}: {exc})"))
            return ""


def _write_png(path: Path, image: Image.Image) -> None:
    # Level 4 writes about twice as fast as Pillow's default 6 for files a few percent larger.
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", compress_level=4))
