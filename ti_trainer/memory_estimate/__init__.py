"""A VRAM estimate that needs no GPU: the peak memory of one training step, and the largest batch that fits.

    estimate_step_bytes("sd21-768", Settings(width=768, height=768, batch=8, checkpointing="all"))
    largest_batch("sdxl", Settings(width=1024, height=1024), budget_bytes=int(7.5 * GIB))

See estimate.py for what the figures compare to, tally.py for how they are counted, and config.py for the
bridge from a TrainConfig and a backend.
"""

from ti_trainer.memory_estimate.architectures import ARCHITECTURES, Architecture, named_architecture
from ti_trainer.memory_estimate.estimate import (
    DEFAULT_BUDGET_GIB,
    GIB,
    Estimate,
    Settings,
    a1111_settings,
    estimate_step_bytes,
    largest_batch,
    least_checkpointing,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_BUDGET_GIB",
    "GIB",
    "Architecture",
    "Estimate",
    "Settings",
    "a1111_settings",
    "estimate_step_bytes",
    "largest_batch",
    "least_checkpointing",
    "named_architecture",
]
