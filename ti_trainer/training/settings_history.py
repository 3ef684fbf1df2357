"""A run's settings against the last run of the same embedding: found from the log layout
(`<log_dir>/<date>/<name>/settings-<datetime>.json`, training/outputs.py), and the differences in words.

No torch here: the Train panel reads the last run's settings too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError

# Where the run lives and what it is called: these say which run it is, not how it trains.
NOT_COMPARED = ("embedding_name", "embeddings_dir", "log_dir", "templates_dirs")


def latest_settings(log_dir: str | Path, embedding_name: str) -> Path | None:
    """The newest settings-*.json a run of `embedding_name` left under `log_dir/<date>/<name>/`."""
    root = Path(log_dir).expanduser()
    if not embedding_name or not root.is_dir():
        return None
    found = list(root.glob(f"*/{glob_escape(embedding_name)}/settings-*.json"))
    return max(found, key=lambda path: path.name, default=None)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def changed_settings(previous: TrainConfig, current: TrainConfig) -> list[str]:
    """One line per setting that differs, e.g. "learn_rate: 0.005 -> 0.001"."""
    lines = []
    for spec in dataclasses.fields(TrainConfig):
        if spec.name in NOT_COMPARED:
            continue
        before, after = getattr(previous, spec.name), getattr(current, spec.name)
        if before != after:
            lines.append(f"{spec.name}: {_shown(before)} -> {_shown(after)}")
    return lines


def resume_changes_message(log_dir: str | Path, current: TrainConfig, initial_step: int) -> str | None:
    """What changed since the last run of this embedding, for a run that resumes it; None when nothing did
    (or there is no readable earlier settings file to compare with)."""
    path = latest_settings(log_dir, current.embedding_name)
    if path is None:
        return None
    try:
        previous = TrainConfig.from_settings_file(path)
    except UserError:
        return None  # an unreadable old file only costs the comparison; it does not stop the run
    changes = changed_settings(previous, current)
    if not changes:
        return None
    return (
        f"Resuming {current.embedding_name!r} from step {initial_step} with settings changed since its last run "
        f"({path}):\n" + "\n".join(f"  {line}" for line in changes)
    )


def _shown(value: object) -> str:
    if isinstance(value, str):
        return value if value else "''"
    return json.dumps(value)
