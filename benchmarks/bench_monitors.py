"""What the monitors cost: the same run with default settings, with every monitor on and with all of them off.

"On" is what the launcher wires with default settings: validation loss and early stopping, vector norms, the
per-image report and previews, at their default cadences (analysis/monitors.py, docs/monitors.md). "Off" is
the same config with `validate_every=0` and `preview_every=0`, and no monitors in the hooks (the norms have no
switch of their own: they are a few numbers every 10 steps). Both run in this one process on one tiny model,
alternating (on, off, off, on, ...) so drifting load falls on both; the ratio printed is the median "on" time
over the median "off" time. Time is this process's CPU time (torch on one thread by default): on a shared
machine the wall-clock time mostly measures the other processes; it is reported beside it. Nothing is
downloaded: the model is built from config.

    python benchmarks/bench_monitors.py                     # 300 steps, 8 images of 128 px, 5 pairs
    python benchmarks/bench_monitors.py --tiny              # the same code in seconds (the smoke test)
See docs/benchmarks.md for the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ti_trainer.analysis.monitors import monitors_for  # noqa: E402
from ti_trainer.backends.contract import PreviewRequest  # noqa: E402
from ti_trainer.backends.tiny import tiny_backend  # noqa: E402
from ti_trainer.cli.demo import draw_image  # noqa: E402
from ti_trainer.config import TrainConfig  # noqa: E402
from ti_trainer.embeddings.create import create_embedding  # noqa: E402
from ti_trainer.training.loop import TrainingHooks, train  # noqa: E402

NAME = "benchmonitors"
SHAPES, COLOURS = ("circle", "square", "triangle", "stripes"), ("red", "blue", "green", "orange")


def draw_images(folder: Path, count: int, size: int) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shape, colour = SHAPES[index % 4], COLOURS[(index // 4 + index) % 4]
        draw_image(shape, colour, size, rng).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a {colour} {shape}, simple shapes", encoding="utf-8")
    return folder


def run_config(root: Path, data: Path, label: str, steps: int, size: int, monitors_on: bool) -> TrainConfig:
    """Default settings, except the folders, the size, the length, a fixed seed, and early stopping: the rule
    still runs, but only suggests, so both runs train every step (a stop would shorten the "on" run). "Off"
    turns off what has a switch."""
    config = TrainConfig(
        embedding_name=NAME,
        data_dir=str(data),
        embeddings_dir=str(root / label / "embeddings"),
        log_dir=str(root / label / "logs"),
        width=size,
        height=size,
        max_steps=steps,
        seed=1,
        early_stopping=False,
    )
    if not monitors_on:
        config.validate_every = 0
        config.preview_every = 0
    return config


def timed_run(
    backend, root: Path, data: Path, label: str, steps: int, size: int, monitors_on: bool
) -> tuple[float, float]:
    """The run's CPU seconds and wall-clock seconds."""
    config = run_config(root, data, label, steps, size, monitors_on)
    create_embedding(backend, NAME, "painting", 2, Path(config.embeddings_dir), overwrite=True)
    quiet = lambda text: None  # noqa: E731
    hooks = TrainingHooks(on_message=quiet, monitors=monitors_for(config, quiet) if monitors_on else [])
    cpu, wall = time.process_time(), time.perf_counter()
    result = train(config, backend, hooks)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert result.steps_done == steps, f"the run ended at step {result.steps_done} of {steps}"
    return cpu, wall


def preview_seconds(backend, size: int) -> float:
    """One preview as a default run draws it (20 steps of Euler a with CFG), for the breakdown."""
    defaults = TrainConfig()
    request = PreviewRequest(
        prompt="a painting",
        negative_prompt="",
        steps=defaults.preview_steps,
        cfg_scale=defaults.preview_cfg_scale,
        seed=defaults.preview_seed,
        width=size,
        height=size,
        sampler=defaults.preview_sampler,
        vectors={},
    )
    started = time.process_time()
    backend.render(request)
    return time.process_time() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per run (default 300)")
    parser.add_argument("--images", type=int, default=8, help="training images (default 8)")
    parser.add_argument("--size", type=int, default=128, help="image size in px (default 128)")
    parser.add_argument("--pairs", type=int, default=5, help="on/off pairs, alternating (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--tiny", action="store_true", help="a few steps on 64 px images: the smoke test")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.images, args.size, args.pairs = 4, 4, 64, 1
    torch.set_num_threads(args.threads)

    backend = tiny_backend("v")
    on, off, wall_on, wall_off = [], [], [], []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = draw_images(root / "data", args.images, args.size)
        timed_run(backend, root, data, "warm-up", min(args.steps, 4), args.size, True)  # first-call costs
        for pair in range(args.pairs):
            # Alternate which goes first, so a machine that speeds up or slows down weighs on both.
            for monitors_on in (True, False) if pair % 2 == 0 else (False, True):
                seconds, wall = timed_run(
                    backend, root, data, f"{pair}-{monitors_on}", args.steps, args.size, monitors_on
                )
                (on if monitors_on else off).append(seconds)
                (wall_on if monitors_on else wall_off).append(wall)
                state = "on " if monitors_on else "off"
                print(
                    f"  pair {pair + 1}: monitors {state} {seconds:.2f} s CPU, {wall:.2f} s wall", flush=True
                )
        preview = preview_seconds(backend, args.size)

    ratio = statistics.median(on) / statistics.median(off)
    wall_ratio = statistics.median(wall_on) / statistics.median(wall_off)
    step_seconds = statistics.median(off) / args.steps
    report = {
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "images": args.images,
        "size": args.size,
        "seconds_on": on,
        "seconds_off": off,
        "ratio": ratio,
        "wall_seconds_on": wall_on,
        "wall_seconds_off": wall_off,
        "wall_ratio": wall_ratio,
        "preview_in_training_steps": preview / step_seconds,
        "command": "python benchmarks/bench_monitors.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(
        f"monitor-overhead ratio (median on / median off, {args.pairs} pair(s), {args.steps} steps, "
        f"{args.images} images of {args.size} px): {ratio:.3f} in CPU time ({wall_ratio:.3f} wall-clock)"
    )
    print(f"one preview costs about {report['preview_in_training_steps']:.1f} training steps")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
