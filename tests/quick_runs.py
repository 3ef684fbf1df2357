"""The one builder of quick-run settings that every suite starts from (core, WebUI, panels).

A quick run trains on 64 px images at batch 2 for a handful of steps on a tiny model: seconds on a CPU.
Suites override what their test is about and the folders their host uses.
"""

from __future__ import annotations

from typing import Any

from ti_trainer.config import TrainConfig

QUICK_RUN: dict[str, Any] = dict(
    template="filewords_name.txt",
    learn_rate="0.01",
    batch_size=2,
    gradient_accumulation=1,
    max_steps=6,
    width=64,
    height=64,
    save_every=2,
    preview_every=0,
    seed=7,
)


def quick_settings(**overrides: Any) -> dict[str, Any]:
    """The quick-run settings with `overrides` applied (folders and names come from the caller)."""
    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    assert not unknown, f"not TrainConfig fields: {sorted(unknown)}"
    return {**QUICK_RUN, **overrides}


def quick_train_config(**overrides: Any) -> TrainConfig:
    return TrainConfig(**quick_settings(**overrides))
