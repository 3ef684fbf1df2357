"""Where the interest of an image lies, so an automatic crop keeps it: faces, detail (entropy) and edges.

The idea of A1111's "Auto focal point crop": each detector proposes a point, and the crop is centred on
their weighted average. Faces use the Haar cascades that ship inside OpenCV's PyPI package, so nothing is
downloaded (A1111 fetches a YuNet model at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PIL import Image

from ti_trainer.errors import UserError

# Detection runs on a copy this size: faces of a tenth of the picture stay well above the cascade's 24 px.
_ANALYSIS_SIDE = 512
_FACE_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_profileface.xml")


@dataclass
class FocalWeights:
    """How much each detector pulls the crop; A1111's defaults."""

    faces: float = 0.9
    entropy: float = 0.15
    edges: float = 0.5


@dataclass
class FocalPoint:
    x: float  # fraction of the width
    y: float  # fraction of the height
    faces_found: int = 0
    proposals: dict[str, tuple[float, float]] = field(default_factory=dict)


def find_focal_point(image: Image.Image, weights: FocalWeights | None = None) -> FocalPoint:
    """The point a square crop of `image` should be centred on. A square image needs no decision."""
    weights = weights or FocalWeights()
    if image.width == image.height:
        return FocalPoint(0.5, 0.5)
    gray = _analysis_copy(image)
    proposals: dict[str, tuple[float, float]] = {}
    faces_found = 0
    if weights.faces > 0:
        faces = detect_faces(gray)
        faces_found = len(faces)
        if faces:
            proposals["faces"] = _weighted_centre(
                [(x + w / 2, y + h / 2, w * h) for x, y, w, h in faces], gray.shape
            )
    if weights.entropy > 0:
        proposals["entropy"] = _most_detailed_window(gray)
    if weights.edges > 0:
        corners = _corner_points(gray)
        if corners:
            proposals["edges"] = _weighted_centre([(x, y, 1.0) for x, y in corners], gray.shape)
    pulls = [(getattr(weights, name), point) for name, point in proposals.items()]
    total = sum(weight for weight, _ in pulls)
    if total <= 0:
        return FocalPoint(0.5, 0.5, faces_found, proposals)
    x = sum(weight * point[0] for weight, point in pulls) / total
    y = sum(weight * point[1] for weight, point in pulls) / total
    return FocalPoint(x, y, faces_found, proposals)


def _cv2():
    try:
        import cv2
    except ImportError as exc:
        raise UserError(
            "The focal-point crop needs OpenCV, which is not installed. Install it with "
            "'pip install opencv-python-headless', or choose the centre crop."
        ) from exc
    return cv2


def _analysis_copy(image: Image.Image) -> np.ndarray:
    scale = min(1.0, _ANALYSIS_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.convert("L").resize(size, Image.BILINEAR))


@cache
def _cascade(file_name: str):
    cv2 = _cv2()
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        return None  # OpenCV 5 moved the Haar cascades out of the main package
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + file_name)
    return None if cascade.empty() else cascade


def detect_faces(gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in `gray`'s pixels; the first cascade that finds any wins."""
    min_side = max(24, min(gray.shape) // 20)
    for file_name in _FACE_CASCADES:
        cascade = _cascade(file_name)
        if cascade is None:
            continue
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
        if len(found):
            return [tuple(int(v) for v in box) for box in found]
    return []


def _weighted_centre(points: list[tuple[float, float, float]], shape: tuple[int, ...]) -> tuple[float, float]:
    height, width = shape[:2]
    total = sum(weight for _, _, weight in points)
    x = sum(px * weight for px, _, weight in points) / total
    y = sum(py * weight for _, py, weight in points) / total
    return x / width, y / height


def _most_detailed_window(gray: np.ndarray) -> tuple[float, float]:
    """Centre of the square window, slid along the long side, whose grey levels carry the most entropy."""
    height, width = gray.shape
    side = min(height, width)
    long_side = max(height, width)
    steps = 16
    best_entropy, best_offset = -1.0, 0
    for index in range(steps + 1):
        offset = round((long_side - side) * index / steps)
        window = gray[:, offset : offset + side] if width >= height else gray[offset : offset + side, :]
        entropy = _entropy(window)
        if entropy > best_entropy + 1e-9:
            best_entropy, best_offset = entropy, offset
    centre = best_offset + side / 2
    return (centre / width, 0.5) if width >= height else (0.5, centre / height)


def _entropy(pixels: np.ndarray) -> float:
    counts = np.bincount(pixels.ravel() // 4, minlength=64).astype(np.float64)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum())


def _corner_points(gray: np.ndarray) -> list[tuple[float, float]]:
    cv2 = _cv2()
    corners = cv2.goodFeaturesToTrack(
        gray, maxCorners=100, qualityLevel=0.04, minDistance=max(7, min(gray.shape) // 50)
    )
    if corners is None:
        return []
    return [(float(x), float(y)) for x, y in corners.reshape(-1, 2)]
