"""`python -m ti_trainer create | train | demo`: the same core the WebUI tab uses, headless."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from ti_trainer.cli import analysis_verbs
from ti_trainer.cli.estimate_verb import add_estimate_verb, run_estimate
from ti_trainer.cli.prepare_verbs import PREPARE_VERBS, add_prepare_verbs, run_prepare_verb
from ti_trainer.config import TrainConfig, cli_flag, field_info
from ti_trainer.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ti_trainer", description="Train Textual Inversion embeddings."
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    create = verbs.add_parser("create", help="create a new embedding from initialization text")
    create.add_argument("name", help="the word you will write in prompts")
    create.add_argument("--init-text", default="*", help="words whose meaning the embedding starts from")
    create.add_argument("--vectors", type=int, default=1, help="vectors per token (1-75)")
    create.add_argument("--embeddings-dir", default="embeddings")
    create.add_argument("--overwrite", action="store_true", help="replace an existing embedding of that name")
    _model_options(create)

    train = verbs.add_parser("train", help="train an embedding on a folder of images")
    train.add_argument("--config", type=Path, help="a settings-*.json from an earlier run: reproduce it")
    _model_options(train)
    add_config_flags(train)

    demo = verbs.add_parser("demo", help="train a small embedding on the built-in tiny model, end to end")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--steps", type=int, default=50)
    demo.add_argument(
        "--model",
        choices=("tiny", "tiny-sdxl"),
        default="tiny",
        help="the built-in tiny model: SD 2.x-like (tiny) or SDXL-like (tiny-sdxl)",
    )

    # Dataset preparation verbs: preprocess, report (ti_trainer/cli/prepare_verbs.py).
    add_prepare_verbs(verbs)
    # Choosing the result: compare, analyze, use-step (ti_trainer/cli/analysis_verbs.py).
    analysis_verbs.add_verbs(verbs)
    # The standalone app: the WebUI tab's panels in a browser (ti_trainer/host/standalone.py).
    _add_app_verb(verbs)
    # What fits in GPU memory, estimated without a GPU (ti_trainer/vram).
    add_estimate_verb(verbs)
    return parser


def _add_app_verb(verbs) -> None:
    app = verbs.add_parser("app", help="open the training panels in your browser (localhost only)")
    app.add_argument(
        "--model",
        default="tiny",
        help="checkpoint file, diffusers folder, or a built-in tiny model: 'tiny' (SD 2.x-like) or 'tiny-sdxl'",
    )
    app.add_argument("--port", type=int, default=7861)
    app.add_argument("--workspace", type=Path, default=Path("ti_trainer_workspace"))
    app.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="tiny",
        help="checkpoint file, diffusers folder, or a built-in tiny model: 'tiny' (SD 2.x-like) or 'tiny-sdxl'",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--parameterization", choices=("eps", "v"), help="override: v for SD 2.x 768-v models, eps otherwise"
    )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, from the field's metadata (config.py). Every default is None, so a
    flag left out changes nothing: TrainConfig's default, or the value in --config's settings file."""
    defaults = TrainConfig()
    types = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        info, kind = field_info(field.name), types[field.name]
        default = getattr(defaults, field.name)
        # argparse formats help with %: a literal one is doubled.
        text = f"{info.help or info.label} (default {default!r})".replace("%", "%%")
        flag = cli_flag(field.name)
        if not flag.startswith("-"):
            parser.add_argument(field.name, metavar=flag, nargs="?", help=text)
        elif kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=field.name, action="append", help=text)
        else:
            parser.add_argument(
                flag, dest=field.name, type=_value_type(kind), choices=info.choices or None, help=text
            )


def _value_type(kind) -> type:
    """int for `int | None` (the seed); the type itself otherwise."""
    options = [option for option in typing.get_args(kind) if option is not type(None)]
    return options[0] if options else kind


TINY_MODEL_NOTE = (
    "Note: this embedding was made for the built-in tiny demo model (--model tiny, the default when no --model "
    "is given), which only the demo and the tests use; it will not work with Stable Diffusion. Create it for "
    "your model with --model path/to/model.safetensors (a checkpoint file) or --model path/to/diffusers-folder, "
    "adding --overwrite to replace this one."
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_settings_file(args.config) if args.config else TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(config, field.name, value)
    return config


EXIT_ABORTED = 130  # the shell's code for a command ended by Ctrl+C


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb in PREPARE_VERBS:
            return run_prepare_verb(args)
        if args.verb in analysis_verbs.VERBS:
            return analysis_verbs.run(args)
        if args.verb == "estimate":
            return run_estimate(args)
        if args.verb == "app":
            from ti_trainer.host.standalone import serve

            serve(args.workspace, args.model, args.port, args.device)
            return 0
        if args.verb == "demo":
            from ti_trainer.cli.demo import run_demo

            run_demo(args.out, args.steps, args.model)
            return 0
        from ti_trainer.backends.loading import TINY, TINY_SDXL, load_backend

        if args.verb == "create":
            from ti_trainer.embeddings.create import create_embedding, init_text_report
            from ti_trainer.fsutil import validate_embedding_name

            validate_embedding_name(args.name)
            backend = load_backend(args.model, args.device, args.parameterization)
            path = create_embedding(
                backend, args.name, args.init_text, args.vectors, args.embeddings_dir, args.overwrite
            )
            print(f"Created {path}")
            for line in init_text_report(backend, args.init_text, args.vectors):
                print(f"  {line}")
            if args.model in (TINY, TINY_SDXL):
                print(TINY_MODEL_NOTE, file=sys.stderr)
            return 0
        from ti_trainer.cli.terminal import train_in_terminal

        config = config_from_args(args)
        config.validate()
        result = train_in_terminal(
            config, lambda: load_backend(args.model, args.device, args.parameterization)
        )
        print(result.summary)
        print(f"Log folder: {result.log_folder}")
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The second Ctrl+C (StopOnInterrupt), or one before training started: leave at once, without a
        # traceback. Files are written atomically, so each holds its last complete save.
        print("\nAborted: nothing more was saved (each file holds its last complete save).", file=sys.stderr)
        return EXIT_ABORTED
