"""The dataset report: what is in a training folder, before any GPU time is spent on it.

Count and sizes, the batch x accumulation combinations that fit, each image's dominant colours and the
set's palette, the images that stand out in colour or composition, and near-duplicates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ti_trainer.images import ImageLoadError, load_image
from ti_trainer.prepare.batches import BatchPlan, batch_plans, nearby_counts
from ti_trainer.prepare.colours import Swatch, dominant_colours, thumbnail_pixels
from ti_trainer.prepare.features import ImageFeatures, image_features
from ti_trainer.prepare.listing import list_folder, require_images
from ti_trainer.prepare.outliers import MIN_IMAGES, Outlier, find_outliers
from ti_trainer.prepare.phash import near_duplicate_groups, perceptual_hash

_PALETTE_SAMPLES_PER_IMAGE = 1024  # each image weighs the same in the palette, whatever its size
# An image with clearly fewer pixels than size x size is enlarged in training. Area, not the short side, so a
# prepared aspect bucket (e.g. 384x640 for 512) is not flagged.
_SMALL_AREA = 0.9


@dataclass
class ImageStats:
    name: str
    width: int
    height: int
    colours: list[Swatch]
    features: ImageFeatures
    phash: str


@dataclass
class DatasetReport:
    folder: str
    count: int
    sizes: dict[str, int]  # "768x768" -> number of images
    images: list[ImageStats]
    palette: list[Swatch]
    batch_plans: list[BatchPlan]
    nearby_counts: list[tuple[int, list[int]]]
    outliers: list[Outlier]
    near_duplicates: list[list[str]]
    smaller_than_size: list[str] = field(default_factory=list)
    size: int | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def build_report(
    folder: Path,
    size: int | None = None,
    max_batch: int = 8,
    progress: Callable[[int, int, str], None] | None = None,
) -> DatasetReport:
    """Analyse every image directly inside `folder`; files that cannot be read are listed in `skipped`.

    `progress(done, total, what)` is called for each image (`what` is its name), then while the hashes are
    compared for near-duplicates.
    """
    folder = Path(folder)
    listing = list_folder(folder, "dataset folder")
    paths = require_images(listing, folder, "dataset folder")
    skipped = [(problem.path.name, problem.reason) for problem in listing.unused]
    stats: list[ImageStats] = []
    samples: list[np.ndarray] = []
    rng = np.random.default_rng(0)
    for index, path in enumerate(paths):
        if progress is not None:
            progress(index, len(paths), path.name)
        try:
            image = load_image(path)
        except ImageLoadError as exc:
            skipped.append((path.name, exc.reason))
            continue
        pixels = thumbnail_pixels(image)
        samples.append(
            pixels[rng.choice(len(pixels), min(len(pixels), _PALETTE_SAMPLES_PER_IMAGE), replace=False)]
        )
        stats.append(
            ImageStats(
                path.name,
                image.width,
                image.height,
                dominant_colours(pixels),
                image_features(image),
                f"{perceptual_hash(image):016x}",
            )
        )
    if progress is not None:
        progress(len(paths), len(paths), "")
    count = len(stats)
    notes = []
    if 0 < count < MIN_IMAGES:
        notes.append(
            f"With {count} images there is too little to say which ones stand out; {MIN_IMAGES} or more are needed."
        )
    return DatasetReport(
        folder=str(folder),
        count=count,
        sizes=dict(
            sorted(Counter(f"{s.width}x{s.height}" for s in stats).items(), key=lambda item: -item[1])
        ),
        images=stats,
        palette=dominant_colours(np.concatenate(samples), count=8) if samples else [],
        batch_plans=batch_plans(count, max_batch),
        nearby_counts=nearby_counts(count, max_batch),
        outliers=find_outliers({s.name: s.features for s in stats}),
        near_duplicates=near_duplicate_groups({s.name: int(s.phash, 16) for s in stats}, progress=progress),
        smaller_than_size=[s.name for s in stats if size and s.width * s.height < _SMALL_AREA * size * size],
        size=size,
        skipped=skipped,
        notes=notes,
    )
