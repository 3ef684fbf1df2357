"""Run one real training step on the CPU and print the peak resident memory it added, in bytes.

Used by tests/test_memory_estimate.py in a fresh process (so nothing else's memory is in the figure):
    python tests/measure_step_rss.py '<Architecture as JSON>' '<Settings as JSON>' LEVEL...
prints, for each checkpointing LEVEL, the bytes the step added at its peak. The peak is the kernel's high-water mark of resident memory (VmHWM), reset just before the step
(/proc/self/clear_refs), minus the resident memory before it: the weights are already there.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    import torch

    from ti_trainer.vram.architectures import Architecture, build_on_meta
    from ti_trainer.vram.estimate import Settings, levers, run_step, store_weights

    torch.set_num_threads(1)  # per-thread kernel buffers stay small and the figure repeatable
    architecture = Architecture(**json.loads(sys.argv[1]))
    settings = Settings(**json.loads(sys.argv[2]))
    model = build_on_meta(architecture, device="cpu")
    store_weights(model, settings)
    added = {}
    for index, level in enumerate(sys.argv[3:]):
        with levers(model, replace(settings, checkpointing=level)):
            if index == 0:  # warm-up: one-time allocations (kernel caches) are not the step's
                run_step(model, settings, None, device="cpu")
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current resident size
            before = resident_kib("VmRSS")
            run_step(model, settings, None, device="cpu")
            added[level] = (resident_kib("VmHWM") - before) * 1024
    print(json.dumps(added))


if __name__ == "__main__":
    main()
