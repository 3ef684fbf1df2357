"""Loading a dataset folder: images as RGB pixels and their captions. Source files are only ever read.

Every way an image can fail becomes an `ImageLoadError` with a short reason an artist can act on, so one bad
file is reported and skipped instead of crashing a run (or, worse, silently training on a grey half-image).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ti_trainer.errors import UserError
from ti_trainer.fsutil import FolderScan, read_text_file, scan_folder

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# A1111 strips the "00012-0-" prefix its old preprocessor put in front of file names.
_LEADING_NUMBERS = re.compile(r"^[-\d]+\s*")

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_BIT_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageLoadError(UserError):
    """One image that could not be used; `reason` is short enough to show in a list of skipped files."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"Could not load the image {self.path}: {reason}. Fix or remove this file.")

    def __reduce__(self):  # picklable, so the error survives a DataLoader worker or a subprocess
        return (type(self), (self.path, self.reason))


@dataclass
class ImageProblem:
    path: Path
    reason: str


@dataclass
class LoadedImage:
    path: Path
    image: Image.Image
    caption: str


@dataclass
class LoadedFolder:
    images: list[LoadedImage]
    skipped: list[ImageProblem]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_image(path: Path, keep_alpha: bool = False) -> Image.Image:
    """The image at `path` as RGB (or RGBA when `keep_alpha` and it has transparency), fully in memory.

    EXIF orientation is applied, so a phone photo trains the way it is displayed; animated files give their
    first frame. Raises ImageLoadError with a plain reason on any failure.
    """
    path = Path(path)
    _check_is_readable_file(path)
    try:
        # A DecompressionBombWarning is raised as an error so that an oversized image is skipped before it
        # takes all memory, rather than merely printed to the console.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()  # decode now, so a truncated file fails here and not halfway through training
                upright = _apply_exif_orientation(opened)
                converted = _to_rgb_or_rgba(upright, keep_alpha, path)
                # The file closes when this block ends; a copy keeps the pixels usable afterwards.
                return converted.copy() if converted is opened else converted
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, _too_large_reason(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(path, "not an image (or a format Pillow cannot read)") from exc
    except MemoryError as exc:
        raise ImageLoadError(path, "not enough memory to load it; scale the image down") from exc
    except OSError as exc:
        raise ImageLoadError(path, _damaged_reason(exc)) from exc
    # Pillow's decoders raise a zoo of other types (SyntaxError, ValueError, struct.error, EOFError…).
    except Exception as exc:
        raise ImageLoadError(path, f"file is damaged ({type(exc).__name__}: {exc})") from exc


def _check_is_readable_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageLoadError(
            path, "image is 0 bytes (an empty file, perhaps an interrupted copy or download)"
        )


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A mangled EXIF block should not cost the artist a good image; the pixels themselves are fine.
        return image


def _to_rgb_or_rgba(image: Image.Image, keep_alpha: bool, path: Path) -> Image.Image:
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        image = _high_bit_depth_to_8bit_gray(image)
    has_alpha = image.mode in _ALPHA_MODES or "transparency" in image.info
    if not has_alpha:
        return image if image.mode == "RGB" else _convert(image, "RGB", path)
    rgba = image if image.mode == "RGBA" else _convert(image, "RGBA", path)
    if keep_alpha:
        return rgba
    # Transparent areas become white, the way the image looks on a page, not the black or garbage colour
    # hidden under alpha 0 that a plain convert("RGB") would expose.
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _convert(image: Image.Image, mode: str, path: Path) -> Image.Image:
    try:
        return image.convert(mode)
    except (ValueError, OSError) as exc:
        raise ImageLoadError(path, f"unsupported colour mode {image.mode}; re-save it as RGB") from exc


def _high_bit_depth_to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale scaled to 0–255; Pillow's own convert clips them to near-white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    else:
        finite_max = float(np.nanmax(values)) if values.size else 0.0
        if image.mode == "F" and finite_max <= 1.0:
            scaled = values * 255.0  # float images conventionally hold 0..1
        elif finite_max <= 255.0:
            scaled = values  # 8-bit data stored in a wider mode
        elif finite_max <= 65535.0:
            scaled = values / 257.0  # 16-bit data, e.g. a 16-bit PNG opened as mode "I"
        else:
            scaled = values * (255.0 / finite_max)
    gray = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L")


def _too_large_reason(exc: Exception) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(pixels.group(1)) / 1e6:.1f} megapixels, " if pixels else ""
    limit_text = f"the limit is {limit / 1e6:.1f}" if limit else "over the limit"
    return f"image is too large (decompression-bomb guard): {size}{limit_text}; scale it down"


def _damaged_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied)"
    message = str(exc)
    if "truncated" in message.lower():
        return "file is truncated (perhaps an interrupted copy or download)"
    if "decoder" in message.lower():
        return "file is damaged or truncated"
    return f"file is damaged ({message})"


@lru_cache(maxsize=32)
def _compile_filename_regex(filename_regex: str) -> re.Pattern[str]:
    try:
        return re.compile(filename_regex)
    except re.error as exc:
        raise UserError(
            f"The filename word regex {filename_regex!r} is not a valid regular expression ({exc}). "
            r"For example '[a-zA-Z]+' turns '00012-red_fox_in_snow.png' into 'red fox in snow'; "
            "leave it empty to use the whole file name."
        ) from exc


def caption_for(image_path: Path, filename_regex: str = "", join_string: str = " ") -> str:
    """The caption of one image, as A1111 finds it: `<stem>.txt` beside it, else words from the file name."""
    image_path = Path(image_path)
    pattern = _compile_filename_regex(filename_regex) if filename_regex else None
    caption_path = image_path.with_suffix(".txt")
    if caption_path.is_file():
        try:
            return read_text_file(caption_path).strip()
        except OSError as exc:
            raise UserError(
                f"The caption file {caption_path} could not be read ({exc.strerror or exc}). "
                "Check that it is not open in another program and that you may read it."
            ) from exc
    text = _LEADING_NUMBERS.sub("", image_path.stem)
    if pattern is not None:
        if pattern.groups <= 1:
            words = pattern.findall(text)
        else:  # findall would give tuples (A1111 then crashes); the whole match is the sensible word
            words = [match.group(0) for match in pattern.finditer(text)]
        text = join_string.join(words)
    return text.strip()


def load_folder(
    folder: Path, keep_alpha: bool = False, filename_regex: str = "", join_string: str = " "
) -> LoadedFolder:
    """Every image directly inside `folder` (sorted by name) with its caption; unusable files in `skipped`.

    Raises UserError when there is nothing to train on: no such folder, no image files, or none loadable.
    """
    folder = Path(folder)
    if filename_regex:
        _compile_filename_regex(filename_regex)  # a bad regex is reported before any image is decoded
    image_paths, skipped = _image_files_in(folder)
    loaded: list[LoadedImage] = []
    for path in image_paths:
        try:
            image = load_image(path, keep_alpha=keep_alpha)
            caption = caption_for(path, filename_regex, join_string)
        except ImageLoadError as exc:
            skipped.append(ImageProblem(path, exc.reason))
            continue
        except UserError as exc:  # an unreadable caption file: this image cannot be trained as intended
            skipped.append(ImageProblem(path, str(exc)))
            continue
        loaded.append(LoadedImage(path, image, caption))
    if not loaded:
        problems = "\n".join(f"  {p.path.name}: {p.reason}" for p in skipped)
        raise UserError(
            f"None of the {len(skipped)} image files in the dataset folder {folder} could be loaded:\n"
            f"{problems}\nReplace or re-export these files (PNG or JPEG) and try again."
        )
    return LoadedFolder(images=loaded, skipped=skipped)


def _image_files_in(folder: Path) -> tuple[list[Path], list[ImageProblem]]:
    """The image files to load, and the special entries (pipes, broken links...) that were passed over."""
    scan = scan_folder(folder, "dataset folder")
    special = [ImageProblem(entry.path, entry.reason) for entry in scan.skipped]
    images = [path for path in scan.files if is_image_file(path)]
    if images:
        return images, special
    raise UserError(_no_images_message(folder, scan))


def _no_images_message(folder: Path, scan: FolderScan) -> str:
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    message = f"The dataset folder {folder} holds no image files ({suffixes})."
    if scan.folders:
        names = ", ".join(path.name for path in scan.folders[:5])
        message += (
            f" It has sub-folders ({names}); images inside sub-folders are not used, "
            "so give the folder that holds the images themselves."
        )
    message += "".join(f"\n  skipped {entry.path.name}: {entry.reason}" for entry in scan.skipped)
    return message
