"""`python -m ti_trainer create | train | demo`: the same core the WebUI tab uses, headless."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ti_trainer.cli import analysis_verbs
from ti_trainer.cli.prepare_verbs import PREPARE_VERBS, add_prepare_verbs, run_prepare_verb
from ti_trainer.config import CLIP_MODES, LATENT_SAMPLING, PRECISIONS, SAVE_FORMATS, TrainConfig
from ti_trainer.errors import UserError

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

from ti_trainer.cli.estimate_verb import add_estimate_verb, run_estimate


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
    train.add_argument("name", nargs="?", help="embedding name (or give --config)")
    train.add_argument("--config", type=Path, help="a settings-*.json from an earlier run: reproduce it")
    _model_options(train)
    defaults = TrainConfig()
    options = [
        ("--data", "data_dir", str, "folder of training images (captions in <image>.txt)"),
        ("--embeddings-dir", "embeddings_dir", str, "where <name>.pt (or .safetensors) lives"),
        ("--log-dir", "log_dir", str, "where copies, previews and logs go"),
        ("--template", "template", str, "prompt template file name or path"),
        ("--lr", "learn_rate", str, "learning rate or schedule, e.g. '0.005:100, 1e-3:1000, 1e-5'"),
        ("--batch", "batch_size", int, "images per micro-batch"),
        ("--grad-accum", "gradient_accumulation", int, "micro-batches per optimizer step"),
        ("--steps", "max_steps", int, "max steps"),
        ("--width", "width", int, None),
        ("--height", "height", int, None),
        ("--save-every", "save_every", int, "save a copy every N steps (0: off)"),
        ("--preview-every", "preview_every", int, "render a preview every N steps (0: off)"),
        ("--clip-value", "clip_grad_value", str, "gradient clipping value or schedule"),
        ("--tag-dropout", "tag_dropout", float, "probability of dropping each caption tag"),
        ("--preview-prompt", "preview_prompt", str, "empty: the first caption of the batch"),
        ("--preview-negative", "preview_negative_prompt", str, None),
        ("--preview-steps", "preview_steps", int, None),
        ("--preview-seed", "preview_seed", int, None),
        ("--seed", "seed", int, "seed for a reproducible run"),
        ("--validate-every", "validate_every", int, "fixed-batch validation loss every N steps (0: off)"),
        ("--early-stop-window", "early_stop_window", int, "DVAR window in steps"),
        ("--early-stop-threshold", "early_stop_threshold", float, "DVAR variance-ratio threshold"),
    ]
    for flag, dest, kind, text in options:
        train.add_argument(
            flag, dest=dest, type=kind, help=f"{text or dest} (default {getattr(defaults, dest)!r})"
        )
    train.add_argument("--clip-mode", dest="clip_grad_mode", choices=CLIP_MODES)
    train.add_argument("--latent-sampling", dest="latent_sampling", choices=LATENT_SAMPLING)
    train.add_argument("--precision", dest="precision", choices=PRECISIONS)
    train.add_argument(
        "--save-format",
        dest="save_format",
        choices=SAVE_FORMATS,
        help="file format of the embedding and its step copies: pt (A1111's, default) or safetensors",
    )
    train.add_argument("--shuffle-tags", dest="shuffle_tags", action="store_true", default=None)
    train.add_argument("--keep-size", dest="keep_size", action="store_true", default=None)
    train.add_argument("--buckets", dest="aspect_buckets", action="store_true", default=None)
    train.add_argument("--alpha-weight", dest="use_alpha_weight", action="store_true", default=None)
    train.add_argument(
        "--no-early-stopping",
        dest="early_stopping",
        action="store_false",
        default=None,
        help="train to max steps even when the validation loss levels off (a step is still suggested)",
    )

    demo = verbs.add_parser("demo", help="train a small embedding on the built-in tiny model, end to end")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--steps", type=int, default=50)
    demo.add_argument(
        "--model",
        choices=("tiny", "tiny-sdxl"),
        default="tiny",
        help="the built-in tiny model: SD 2.x-like (tiny) or SDXL-like (tiny-sdxl)",
    )

    # Dataset preparation verbs: preprocess, report (ti_trainer/prepare/cli_verbs.py).
    add_prepare_verbs(verbs)
    # Choosing the result: compare, analyze, use-step (ti_trainer/analysis/commands.py).
    analysis_verbs.add_verbs(verbs)
    # The standalone app: the WebUI tab's panels in a browser (ti_trainer/host/standalone.py).
    _add_app_verb(verbs)
    # What fits in GPU memory, estimated without a GPU (ti_trainer/vram).
    add_estimate_verb(verbs)
    return parser


def _add_app_verb(verbs) -> None:
    app = verbs.add_parser("app", help="open the training panels in your browser (localhost only)")
    app.add_argument(
        "--model", default="tiny", help="checkpoint file, diffusers folder, or 'tiny' (built in)"
    )
    app.add_argument("--port", type=int, default=7861)
    app.add_argument("--workspace", type=Path, default=Path("ti_trainer_workspace"))
    app.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="tiny", help="checkpoint file, diffusers folder, or 'tiny' (built in)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--parameterization", choices=("eps", "v"), help="override: v for SD 2.x 768-v models, eps otherwise"
    )


TINY_MODEL_NOTE = (
    "Note: this embedding was made for the built-in tiny demo model (--model tiny, the default when no --model "
    "is given), which only the demo and the tests use; it will not work with Stable Diffusion. Create it for "
    "your model with --model path/to/model.safetensors (a checkpoint file) or --model path/to/diffusers-folder, "
    "adding --overwrite to replace this one."
)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_settings_file(args.config) if args.config else TrainConfig()
    for key, value in vars(args).items():
        if value is not None and hasattr(config, key):
            setattr(config, key, value)
    if args.name:
        config.embedding_name = args.name
    return config


EXIT_ABORTED = 130  # the shell's code for a command ended by Ctrl+C


class StopOnInterrupt:
    """The first Ctrl+C asks the run to stop at the next step boundary and save; the second aborts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nStopping after this step and saving... (Ctrl+C again to abort)", file=sys.stderr)


def run_training(config: TrainConfig, backend: Backend):
    from tqdm import tqdm

    from ti_trainer.analysis.monitors import monitors_for
    from ti_trainer.training.loop import TrainingHooks, train

    bar = None

    def on_step(report):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=report.end_step, initial=report.step - 1, unit="step", dynamic_ncols=True)
        bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.learn_rate:g}", epoch=report.epoch)
        bar.update(1)

    with StopOnInterrupt() as stop:
        hooks = TrainingHooks(
            on_step=on_step,
            on_message=lambda text: print(text, file=sys.stderr),
            should_stop=lambda: stop.requested,
            monitors=monitors_for(config, on_message=lambda text: print(text, file=sys.stderr)),
        )
        try:
            return train(config, backend, hooks)
        finally:
            if bar is not None:
                bar.close()


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
        config = config_from_args(args)
        config.validate()
        backend = load_backend(args.model, args.device, args.parameterization)
        result = run_training(config, backend)
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
