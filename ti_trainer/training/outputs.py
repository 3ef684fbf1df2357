"""Everything a run writes, in A1111's log layout (reference/a1111.md §1.5, §1.10, §8).

`<log_dir>/<YYYY-MM-DD>/<name>/` holds `embeddings/<name>-<step>.pt` (or `.safetensors`, the run's save format),
`images/<name>-<step>.png`,
`image_embeddings/<name>-<step>.png`, `textual_inversion_loss.csv` and `settings-<datetime>.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, PngImagePlugin

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import (
    embedding_to_dict,
    optimizer_state_path,
    save_embedding,
    save_optimizer_state,
)
from ti_trainer.fsutil import atomic_write, atomic_write_text, explained_write_errors

LOSS_CSV = "textual_inversion_loss.csv"
LOSS_COLUMNS = ("step", "epoch", "epoch_step", "loss", "learn_rate")


@dataclass
class RunFolders:
    root: Path

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def image_embeddings(self) -> Path:
        return self.root / "image_embeddings"

    @property
    def loss_csv(self) -> Path:
        return self.root / LOSS_CSV

    @classmethod
    def for_run(cls, log_dir: str | Path, name: str, today: datetime.date | None = None) -> RunFolders:
        day = (today or datetime.date.today()).strftime("%Y-%m-%d")
        folders = cls(Path(log_dir) / day / name)
        with explained_write_errors(folders.root):
            folders.root.mkdir(parents=True, exist_ok=True)
        return folders


def write_settings(folders: RunFolders, config: TrainConfig, extra: dict) -> Path:
    """A1111's settings keys (so its readers work) plus our whole config, which reproduces the run."""
    now = datetime.datetime.now()
    data = {
        "datetime": now.strftime("%Y-%m-%d %H:%M:%S"),
        "embedding_name": config.embedding_name,
        "learn_rate": config.learn_rate,
        "batch_size": config.batch_size,
        "gradient_step": config.gradient_accumulation,
        "data_root": config.data_dir,
        "log_directory": str(folders.root),
        "training_width": config.width,
        "training_height": config.height,
        "steps": config.max_steps,
        "clip_grad_mode": config.clip_grad_mode,
        "clip_grad_value": config.clip_grad_value,
        "latent_sampling_method": config.latent_sampling,
        "create_image_every": config.preview_every,
        "save_embedding_every": config.save_every,
        "save_image_with_stored_embedding": config.save_image_with_embedding,
        **extra,
        "ti_trainer_config": config.to_dict(),
    }
    path = folders.root / f"settings-{now.strftime('%Y-%m-%d-%H-%M-%S')}.json"
    return atomic_write_text(path, json.dumps(data, indent=4))


def epoch_of(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step within it) of optimizer step `step` (1-based), both counted from 0.

    A1111's meaning (its loss CSV, and its console's "[Epoch N: ...]"): steps 1..steps_per_epoch are epoch 0.
    The CSV, the CLI's progress, the panel and the API's progress all use this one.
    """
    return divmod(step - 1, max(1, steps_per_epoch))


class LossLog:
    """Appends one row per logged step. On resume, rows past the resume step (from a run that crashed after
    its last save) are dropped first, so the file describes one continuous run."""

    def __init__(self, path: Path, steps_per_epoch: int, resume_step: int):
        self.path = path
        self.steps_per_epoch = max(1, steps_per_epoch)
        if path.exists():
            with path.open(newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.DictReader(handle) if row.get("step", "").isdigit()]
            kept = [row for row in rows if int(row["step"]) <= resume_step]
            if len(kept) != len(rows):
                buffer = io.StringIO()
                writer = csv.DictWriter(buffer, fieldnames=LOSS_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
                atomic_write_text(path, buffer.getvalue())

    def write(self, step: int, loss: float, learn_rate: float) -> None:
        new = not self.path.exists()
        with explained_write_errors(self.path), self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(LOSS_COLUMNS)
            epoch, epoch_step = epoch_of(step, self.steps_per_epoch)
            writer.writerow([step, epoch, epoch_step, f"{loss:.7f}", learn_rate])


def step_copy(embedding: Embedding) -> Embedding:
    """The embedding as A1111 names its periodic copies: `<name>-<step>`."""
    return dataclasses.replace(embedding, name=f"{embedding.name}-{embedding.step}")


def save_step_copy(
    folders: RunFolders,
    embedding: Embedding,
    optimizer_state: dict | None,
    resume_state: dict,
    save_format: str = "pt",
) -> Path:
    """`embeddings/<name>-<step>.pt` (or `.safetensors`): its stored name is `<name>-<step>` and its stored
    step is `<step>`."""
    copy = step_copy(embedding)
    path = save_embedding(copy, folders.embeddings / f"{copy.name}.{save_format}")
    if optimizer_state is not None:
        save_optimizer_state(copy, path, optimizer_state, resume_state)
    return path


def save_current(
    embedding: Embedding,
    path: Path,
    optimizer_state: dict | None,
    resume_state: dict,
    replaces: Path | None = None,
) -> Path:
    """Write the embedding the run trains. `replaces`: the file it started from when that was in the other
    format; it goes (with its .optim) once the new file is safely written, as the WebUI would otherwise load
    two embeddings of one name, and the next run would resume from the stale one."""
    save_embedding(embedding, path)
    if optimizer_state is not None:
        save_optimizer_state(embedding, path, optimizer_state, resume_state)
    if replaces is not None and replaces != path:
        for stale in (replaces, optimizer_state_path(replaces)):
            stale.unlink(missing_ok=True)
    return path


def save_preview(folders: RunFolders, embedding: Embedding, image: Image.Image, infotext: str) -> Path:
    """`images/<name>-<step>.png` with the generation parameters as A1111 writes them."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    path = folders.images / f"{embedding.name}-{embedding.step}.png"
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def save_preview_with_embedding(folders: RunFolders, embedding: Embedding, image: Image.Image) -> Path:
    """`image_embeddings/<name>-<step>.png`: the preview carrying the embedding (text chunk + pixel block)."""
    from ti_trainer.embeddings.png import save_image_with_embedding

    copy = step_copy(embedding)
    return save_image_with_embedding(
        image,
        embedding_to_dict(copy),
        folders.image_embeddings / f"{copy.name}.png",
        title=f"<{copy.name}>",
        footer_left=embedding.sd_checkpoint_name or "",
        footer_mid=f"[{embedding.sd_checkpoint}]" if embedding.sd_checkpoint else "",
        footer_right=f"{embedding.num_vectors}v {embedding.step}s",
    )
