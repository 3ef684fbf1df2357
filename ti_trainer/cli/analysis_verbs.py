"""CLI verbs for choosing the result: `compare`, `analyze`, `use-step` (wired into cli/main.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VERBS = ("compare", "analyze", "use-step")


def add_verbs(verbs) -> None:
    compare = verbs.add_parser(
        "compare", help="render a grid of saved steps x prompts for a run, saved in its log folder"
    )
    compare.add_argument(
        "run_dir", type=Path, help="the run's log folder, e.g. textual_inversion/<date>/<name>"
    )
    compare.add_argument(
        "--steps", default="", help="saved steps to show, e.g. '100, 200-400' (default: all)"
    )
    compare.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        help="a prompt with [name] where the embedding goes; repeat for more columns (default: the run's saved "
        "prompts, else a city, still life, creature, landscape, space scene and portrait)",
    )
    compare.add_argument("--negative", help="negative prompt")
    compare.add_argument("--seeds", help="seeds, e.g. '1, 2' (each adds a column per prompt)")
    compare.add_argument(
        "--width", type=int, help="image width (default: the run's preview or training width)"
    )
    compare.add_argument("--height", type=int)
    compare.add_argument("--sampler-steps", type=int, help="sampling steps per image")
    compare.add_argument("--cfg", type=float, help="CFG scale")
    compare.add_argument("--sampler", help="Euler a, Euler, DDIM, DPM++ 2M")
    _model_options(compare)

    analyze = verbs.add_parser(
        "analyze", help="print a run's suggested step and warnings; write its loss and norm charts"
    )
    analyze.add_argument("run_dir", type=Path)
    analyze.add_argument("--window", type=int, help="DVAR window in steps (default: the run's setting)")
    analyze.add_argument("--threshold", type=float, help="DVAR threshold (default: the run's setting)")

    use = verbs.add_parser("use-step", help="copy one saved step into the embeddings folder under a new name")
    use.add_argument("run_dir", type=Path)
    use.add_argument("step", type=int)
    use.add_argument("name", help="the word you will write in prompts")
    use.add_argument("--embeddings-dir", help="default: the run's embeddings folder")
    use.add_argument("--overwrite", action="store_true")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="the checkpoint or diffusers folder the run was trained on (default: the run's built-in tiny model)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parameterization", choices=("eps", "v"))


def run(args: argparse.Namespace) -> int:
    """Run one of VERBS; UserError propagates to the CLI, which prints it for the artist."""
    from ti_trainer.analysis.run_files import RunInfo

    run_info = RunInfo.open(args.run_dir)
    if args.verb == "compare":
        return _compare(run_info, args)
    if args.verb == "analyze":
        return _analyze(run_info, args)
    return _use_step(run_info, args)


def _compare(run_info, args) -> int:
    from ti_trainer.analysis import compare
    from ti_trainer.backends.loading import load_backend
    from ti_trainer.embeddings.files import load_embedding

    settings = compare.load_settings(run_info)
    if args.prompts:
        settings.prompts = args.prompts
    if args.seeds:
        settings.seeds = compare.parse_seeds(args.seeds)
    for attribute, value in (
        ("negative_prompt", args.negative),
        ("width", args.width),
        ("height", args.height),
        ("sampler_steps", args.sampler_steps),
        ("cfg_scale", args.cfg),
        ("sampler", args.sampler),
    ):
        if value is not None:
            setattr(settings, attribute, value)
    settings.check()
    saved = run_info.saved_steps()
    steps = compare.parse_steps(args.steps, list(saved))
    trained_on = run_info.trained_on()
    model, parameterization = _model_to_render_with(args, trained_on)
    backend = load_backend(model, args.device, parameterization)
    if trained_on and trained_on != backend.model_name:
        print(
            f"Note: this run was trained on {trained_on}; comparing with {backend.model_name}.",
            file=sys.stderr,
        )
    vectors = load_embedding(saved[steps[0]]).num_vectors if steps else 1
    render = compare.backend_renderer(backend, run_info.name, vectors)

    def progress(done: int, total: int) -> None:
        print(f"\rRendering {done}/{total}", end="", file=sys.stderr, flush=True)

    grid = compare.render_grid(run_info, settings, render, steps, on_progress=progress, family=backend.family)
    print(file=sys.stderr)
    for note in grid.notes:
        print(f"Note: {note}", file=sys.stderr)
    print(grid.path)
    return 0


def _model_to_render_with(args, trained_on: str | None) -> tuple[str, str | None]:
    """The model and parameterization `compare` loads: `--model` when given; else the built-in tiny model the
    run was trained on (its settings file names it), or the tiny SD model for a run that names none. A run on
    a real checkpoint needs it named: rendering it with a tiny model would only fail on the vectors' width."""
    from ti_trainer.backends.loading import TINY, built_in_model
    from ti_trainer.errors import UserError

    if args.model:
        return args.model, args.parameterization
    if trained_on is None:
        return TINY, args.parameterization
    built_in = built_in_model(trained_on)
    if built_in:
        return built_in[0], args.parameterization or built_in[1]
    raise UserError(
        f"This run was trained on {trained_on}. Give that model with --model (its checkpoint file or diffusers "
        "folder) to render the comparison with it."
    )


def _analyze(run_info, args) -> int:
    from dataclasses import replace

    from ti_trainer.analysis import results
    from ti_trainer.analysis.monitors import stopping_rule
    from ti_trainer.fsutil import atomic_write

    rule = stopping_rule(run_info.config)
    if args.window is not None:
        rule = replace(rule, window_steps=args.window)
    if args.threshold is not None:
        rule = replace(rule, threshold=args.threshold)
    analysis = results.analyse(run_info, rule)
    for line in results.summary_lines(analysis):
        print(line)
    step, table = results.image_table(run_info)
    if table:
        print(f"\nImages at step {step} (heaviest gradient share first):")
        for image, caption, loss, share, note in table:
            print(f"  {share:5.1f}%  loss {loss:<8}  {image}  {caption!r}  {note}".rstrip())
    for filename, chart in (
        ("loss_chart.png", results.loss_chart(analysis)),
        ("norm_chart.png", results.norm_chart(analysis)),
    ):
        path = atomic_write(run_info.root / filename, lambda tmp, chart=chart: chart.save(tmp, format="PNG"))
        print(f"Wrote {path}")
    if analysis.suggested_step is not None:
        print(f"suggested_step={analysis.suggested_step}")
    return 0


def _use_step(run_info, args) -> int:
    from ti_trainer.analysis.use_step import use_step

    embeddings_dir = args.embeddings_dir or run_info.config.embeddings_dir
    path = use_step(run_info, args.step, args.name, embeddings_dir, args.overwrite)
    print(f"Wrote {path}: write {args.name!r} in a prompt to use step {args.step}.")
    return 0
