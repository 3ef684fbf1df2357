"""Use this step: put one saved copy into the embeddings folder under a name the artist picks.

The seeds copy `name-165.pt` into the embeddings folder by hand and then rename it. Here the copy is written
atomically under a checked name (the file name is the word used in prompts, as in A1111), carrying the
step it was trained for, and the host reloads its embeddings so the word works in txt2img at once. With its
optimizer state copied too, training that name again resumes from this step.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ti_trainer.analysis.run_files import RunInfo
from ti_trainer.embeddings.create import existing_embedding_file
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import optimizer_state_path, save_embedding
from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write, confined_path, validate_embedding_name


def use_step(
    run: RunInfo,
    step: int,
    new_name: str,
    embeddings_dir: str | Path,
    overwrite: bool = False,
    refresh: Callable[[], None] = lambda: None,
) -> Path:
    """Write `<embeddings_dir>/<new_name>.pt` (or `.safetensors`, as the copy) from the run's copy at `step`;
    return its path."""
    name = validate_embedding_name(new_name)
    saved = run.saved_steps()
    if step not in saved:
        known = ", ".join(map(str, saved)) or "none"
        raise UserError(f"Step {step} has no saved copy in {run.embeddings_folder}. Saved steps: {known}.")
    embeddings_dir = Path(embeddings_dir)
    existing = existing_embedding_file(embeddings_dir, name)
    if existing is not None and not overwrite:
        raise UserError(
            f"An embedding named {name!r} already exists ({existing}). Pick another name, or tick 'overwrite' "
            "to replace it."
        )
    source = run.step_embedding(step)  # refused if another model's run left it in this folder
    target = confined_path(embeddings_dir, name, saved[step].suffix)  # the run's save format
    copy = Embedding(name, source.vectors, source.step, source.sd_checkpoint, source.sd_checkpoint_name)
    save_embedding(copy, target)
    if existing is not None and existing != target:
        existing.unlink()  # a `<name>` in the other format would otherwise shadow the new file in A1111
        optimizer_state_path(existing).unlink(missing_ok=True)
    optimizer_file = optimizer_state_path(saved[step])
    target_optimizer = optimizer_state_path(target)
    if optimizer_file.is_file():
        atomic_write(target_optimizer, lambda tmp: shutil.copyfile(optimizer_file, tmp))
    elif target_optimizer.is_file():
        target_optimizer.unlink()  # it belonged to the vectors just replaced
    refresh()
    return target
