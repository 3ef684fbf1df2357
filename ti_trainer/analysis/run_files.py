"""A run's log folder as the analysis reads and writes it (the layout of training/outputs.py, plus ours).

Beside A1111's files, a run folder holds:
- `validation_loss.csv`: step, loss on the fixed validation batch, DVAR variance ratio;
- `embedding_norms.csv`: step and the length of each of the embedding's vectors;
- `image_report.csv`: per image and step, its loss and its share of the gradient (from the training passes at
  batch 1, on the image probe otherwise: image_report.py);
- `analysis.json`: the ordinary token-norm range, the suggested step, whether the run stopped early;
- `compare_settings.json` and `compare/`: the comparison prompts of this run and the grids rendered.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ti_trainer.backends.contract import ModelFamily
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.checks import require_fits, require_width
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write_text, explained_write_errors
from ti_trainer.training.outputs import LOSS_CSV

VALIDATION_CSV = "validation_loss.csv"
NORMS_CSV = "embedding_norms.csv"
IMAGE_REPORT_CSV = "image_report.csv"
SUMMARY_JSON = "analysis.json"
COMPARE_SETTINGS_JSON = "compare_settings.json"
COMPARE_DIR = "compare"

VALIDATION_COLUMNS = ("step", "loss", "variance_ratio")
IMAGE_REPORT_COLUMNS = ("step", "image", "caption", "loss", "gradient_share")


class CsvLog:
    """One row per call, header first. On resume, rows past the resume step are dropped first (they come from
    a run that went on after its last save), so the file describes one continuous run."""

    def __init__(self, path: Path, columns: list[str] | tuple[str, ...], resume_step: int):
        self.path = Path(path)
        self.columns = list(columns)
        self.steps: set[int] = set()  # steps already in the file
        if not self.path.exists():
            return
        rows = read_rows(self.path)
        header = list(rows[0].keys()) if rows else self.columns
        kept = []  # a fresh run, or a file of another layout (e.g. more vectors), starts over
        if resume_step > 0 and header == self.columns:
            kept = [row for row in rows if (_step(row) or 0) and _step(row) <= resume_step]
        write_rows(self.path, self.columns, kept)
        self.steps = {_step(row) for row in kept}

    def write(self, values: list) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with explained_write_errors(self.path), self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(self.columns)
            writer.writerow(values)
        self.steps.add(int(values[0]))


def _step(row: dict) -> int | None:
    value = (row.get("step") or "").strip()
    return int(value) if value.isdigit() else None


def read_rows(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, columns: list[str], rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(Path(path), buffer.getvalue())


def number(value: float) -> str:
    """Floats in CSVs: enough digits to round-trip the float32 values they come from."""
    return f"{value:.9g}"


def read_summary(root: Path) -> dict:
    path = Path(root) / SUMMARY_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged summary is rebuilt by the next run; the CSVs hold the record


def update_summary(root: Path, **values) -> Path:
    summary = read_summary(root)
    summary.update(values)
    return atomic_write_text(Path(root) / SUMMARY_JSON, json.dumps(summary, indent=2, sort_keys=True))


@dataclass
class Curve:
    steps: list[int]
    values: list[float]


@dataclass
class RunInfo:
    """A finished or running training run, read from its log folder."""

    root: Path
    config: TrainConfig
    name: str

    @classmethod
    def open(cls, folder: str | Path) -> RunInfo:
        root = Path(folder).expanduser()
        settings = settings_files(root)
        if not root.is_dir() or not settings:
            raise UserError(
                f"{root} is not a training run's log folder (it has no settings-*.json). Give the folder that "
                "holds the run's embeddings/ and images/, e.g. textual_inversion/2024-05-01/my-style."
            )
        config = TrainConfig.from_settings_file(settings[-1])
        name = config.embedding_name or root.name
        return cls(root, config, name)

    def trained_on(self) -> str | None:
        """The name of the model the run trained on, as its newest settings file records it (None if it
        records none, or cannot be read)."""
        try:
            recorded = json.loads(settings_files(self.root)[-1].read_text(encoding="utf-8"))
        except (OSError, ValueError, IndexError):
            return None
        return recorded.get("model_name") if isinstance(recorded, dict) else None

    @property
    def embeddings_folder(self) -> Path:
        return self.root / "embeddings"

    def saved_steps(self) -> dict[int, Path]:
        """Step -> `embeddings/<name>-<step>.pt` (or `.safetensors`, the run's save format), in step order."""
        pattern = re.compile(rf"^{re.escape(self.name)}-(\d+)\.(pt|safetensors)$")
        found = {}
        for path in sorted(self.embeddings_folder.glob(f"{glob.escape(self.name)}-*")):
            match = pattern.match(path.name)
            if match:
                found.setdefault(int(match.group(1)), path)
        return dict(sorted(found.items()))

    def step_embedding(self, step: int, family: ModelFamily | None = None) -> Embedding:
        """The copy saved at `step`, checked as `step_embeddings` checks it."""
        return self.step_embeddings([step], family)[step]

    def step_embeddings(self, steps: list[int], family: ModelFamily | None = None) -> dict[int, Embedding]:
        """The copies saved at `steps`, each refused when the model `family` (when known) cannot take its
        vectors (an SDXL copy on SD 2.x, one of another width...) or, without a model, when they are not as wide
        as the other copies of this run: a run of the same name on another model writes into the same dated
        folder, and its copies must not be mixed with these."""
        saved = self.saved_steps()
        embeddings = {step: load_embedding(saved[step]) for step in steps}
        run_width = self.vector_width() if family is None else None
        for step, embedding in embeddings.items():
            if family is not None:
                require_fits(saved[step], embedding.vectors, family)
            else:
                require_width(
                    saved[step],
                    embedding.width,
                    run_width,
                    "the other copies of this run hold",
                    "It comes from another run of the same name, on another model: pick another step.",
                )
        return embeddings

    def vector_width(self) -> int:
        """The width most of this run's readable saved copies have (on a tie, the latest copy's)."""
        widths = []
        for path in self.saved_steps().values():
            with contextlib.suppress(UserError):  # a damaged copy is refused when it is chosen, not here
                widths.append(load_embedding(path).width)
        counts = Counter(widths)
        return max(reversed(widths), key=lambda width: counts[width])

    def training_loss(self) -> Curve:
        return _curve(self.root / LOSS_CSV, "loss")

    def validation_loss(self) -> Curve:
        return _curve(self.root / VALIDATION_CSV, "loss")

    def norms(self, encoder: str | None = None) -> tuple[list[int], list[list[float]]]:
        """Steps, and per step the length of each vector (of text encoder `encoder`'s vectors, for an
        embedding with one set per encoder: SDXL)."""
        prefix = "vector_" if encoder is None else f"{encoder}_vector_"
        steps, rows = [], []
        for row in read_rows(self.root / NORMS_CSV):
            step = _step(row)
            if step is None:
                continue
            steps.append(step)
            rows.append([float(row[key]) for key in row if key.startswith(prefix)])
        return steps, rows

    def image_report(self, step: int | None = None) -> tuple[int | None, list[dict[str, str]]]:
        """The per-image rows of `step` (default: the latest step reported)."""
        rows = read_rows(self.root / IMAGE_REPORT_CSV)
        steps = sorted({_step(row) for row in rows if _step(row) is not None})
        if not steps:
            return None, []
        chosen = step if step in steps else steps[-1]
        return chosen, [row for row in rows if _step(row) == chosen]

    def summary(self) -> dict:
        return read_summary(self.root)


def _curve(path: Path, column: str) -> Curve:
    steps, values = [], []
    for row in read_rows(path):
        step = _step(row)
        try:
            value = float(row.get(column, ""))
        except ValueError:
            continue
        if step is not None:
            steps.append(step)
            values.append(value)
    return Curve(steps, values)


def settings_files(root: Path) -> list[Path]:
    """A run folder's settings files, oldest first (each start or resume writes one)."""
    return sorted(root.glob("settings-*.json"))


def find_runs(log_dir: str | Path) -> list[Path]:
    """Run folders under an A1111 log folder (`<log>/<date>/<name>/`), most recently trained first."""
    log_dir = Path(log_dir).expanduser()
    if not log_dir.is_dir():
        return []
    runs = {settings.parent for settings in log_dir.glob("*/*/settings-*.json")}
    runs |= {settings.parent for settings in log_dir.glob("settings-*.json")}

    def latest(run: Path) -> float:
        return max(path.stat().st_mtime for path in run.glob("settings-*.json"))

    return sorted(runs, key=latest, reverse=True)
