"""A VRAM estimate that needs no GPU: the peak memory of one training step, and the largest batch that fits.

    from ti_trainer.vram.estimate import GIB, Settings, estimate_step_bytes, largest_batch
    estimate_step_bytes("sd21-768", Settings(width=768, height=768, batch=8, checkpointing="all"))
    largest_batch("sdxl", Settings(width=1024, height=1024), budget_bytes=int(7.5 * GIB))

estimate.py says what the figures compare to, tally.py how they are counted, architectures.py which models
are known, for_config.py the bridge from a TrainConfig and a backend (and the one-line summary); the
`estimate` verb is cli/estimate_verb.py.
"""
