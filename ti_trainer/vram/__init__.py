"""A VRAM estimate that needs no GPU: the peak memory of one training step, and the largest batch that fits.

    from ti_trainer.vram import GIB, Settings, estimate_step_bytes, largest_batch
    estimate_step_bytes("sd21-768", Settings(width=768, height=768, batch=8, checkpointing="all"))
    largest_batch("sdxl", Settings(width=1024, height=1024), budget_bytes=int(7.5 * GIB))

estimate.py says what the figures compare to, tally.py how they are counted, architectures.py which models
are known, for_config.py the bridge from a TrainConfig and a backend (and the one-line summary), cli_verb.py
the `estimate` verb. Names load on first use, so that importing the CLI does not import torch.
"""

import importlib

_HOMES = {
    "ARCHITECTURES": "architectures",
    "Architecture": "architectures",
    "named_architecture": "architectures",
    "DEFAULT_BUDGET_GIB": "estimate",
    "GIB": "estimate",
    "Estimate": "estimate",
    "Settings": "estimate",
    "a1111_settings": "estimate",
    "estimate_step_bytes": "estimate",
    "largest_batch": "estimate",
    "least_checkpointing": "estimate",
    "estimate_for_config": "for_config",
    "estimate_note": "for_config",
    "summary": "for_config",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
