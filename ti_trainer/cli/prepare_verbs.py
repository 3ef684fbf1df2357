"""`python -m ti_trainer preprocess SOURCE DEST ...` and `python -m ti_trainer report FOLDER ...`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ti_trainer.prepare.blip import DEFAULT_BLIP_MODEL
from ti_trainer.prepare.captions import EXISTING_CAPTION_ACTIONS
from ti_trainer.prepare.geometry import FLIPS
from ti_trainer.prepare.preprocess import CROP_MODES

PREPARE_VERBS = ("preprocess", "report")


def add_prepare_verbs(verbs: argparse._SubParsersAction) -> None:
    pre = verbs.add_parser("preprocess", help="crop, split, flip and caption a folder of images for training")
    pre.add_argument("source", type=Path, help="folder of your images (only read, never changed)")
    pre.add_argument("dest", type=Path, help="folder for the prepared images and captions")
    pre.add_argument(
        "--size", type=int, default=512, help="output size in px (512 for SD 2.x base, 768 for 768-v)"
    )
    pre.add_argument(
        "--crop",
        choices=CROP_MODES,
        default="center",
        help="center; focal: keep faces and detail in frame; keep: keep the aspect ratio (bucketed training)",
    )
    pre.add_argument("--focal-faces", type=float, default=0.9, help="pull of faces on a focal crop")
    pre.add_argument("--focal-entropy", type=float, default=0.15, help="pull of the most detailed area")
    pre.add_argument("--focal-edges", type=float, default=0.5, help="pull of edges and corners")
    pre.add_argument("--split", action="store_true", help="split images much longer than wide into tiles")
    pre.add_argument(
        "--split-threshold", type=float, default=0.5, help="split when short/long side is at most this"
    )
    pre.add_argument("--split-overlap", type=float, default=0.2, help="overlap of neighbouring tiles (0-0.9)")
    pre.add_argument(
        "--flip", action="append", choices=FLIPS, default=[], help="add mirrored copies (repeatable)"
    )
    pre.add_argument("--caption", action="store_true", help="caption each image with BLIP")
    pre.add_argument(
        "--blip-model", default=DEFAULT_BLIP_MODEL, help="Hugging Face model name or local folder"
    )
    pre.add_argument(
        "--models-dir", type=Path, help="where downloaded models are kept (default: the HF cache)"
    )
    pre.add_argument(
        "--existing-caption",
        choices=EXISTING_CAPTION_ACTIONS,
        default="keep",
        help="what to do with a source image's own .txt caption (default keep)",
    )

    rep = verbs.add_parser(
        "report", help="what a dataset folder holds: sizes, colours, outliers, caption lint"
    )
    rep.add_argument("folder", type=Path)
    rep.add_argument("--json", action="store_true", help="machine-readable output")
    rep.add_argument("--size", type=int, help="training size: flags images smaller than it")
    rep.add_argument("--max-batch", type=int, default=8, help="largest batch size your GPU takes")
    rep.add_argument(
        "--init-text", default="", help="the embedding's initialization text: flags its words in captions"
    )
    rep.add_argument("--template", default="style_filewords.txt", help="template for the token budget")
    rep.add_argument("--name", default="embedding", help="embedding name for the token budget")
    rep.add_argument("--vectors", type=int, default=1, help="vectors per token for the token budget")
    rep.add_argument(
        "--model", help="model whose tokenizer counts the token budget (checkpoint or diffusers folder)"
    )


def run_prepare_verb(args: argparse.Namespace) -> int:
    return _preprocess(args) if args.verb == "preprocess" else _report(args)


def _preprocess(args: argparse.Namespace) -> int:
    from ti_trainer.cli.terminal import StopOnInterrupt
    from ti_trainer.prepare.captioners import BLIP_LABEL, build_captioner
    from ti_trainer.prepare.focal import FocalWeights
    from ti_trainer.prepare.preprocess import PrepareOptions, prepare_dataset

    options = PrepareOptions(
        size=args.size,
        crop=args.crop,
        focal=FocalWeights(args.focal_faces, args.focal_entropy, args.focal_edges),
        split=args.split,
        split_threshold=args.split_threshold,
        split_overlap=args.split_overlap,
        flips=tuple(dict.fromkeys(args.flip)),
        existing_caption=args.existing_caption,
    )
    options.validate()
    message = lambda text: print(text, file=sys.stderr)  # noqa: E731
    captioner = build_captioner(
        [BLIP_LABEL] if args.caption else [], {}, args.blip_model, args.models_dir, message
    )
    bar, progress = _progress_bar()
    with StopOnInterrupt() as stop:
        try:
            result = prepare_dataset(
                args.source, args.dest, options, captioner, progress, lambda: stop.requested
            )
        finally:
            bar.close()
            if captioner is not None:
                captioner.close()
    print("\n".join(result.lines()))
    return 0 if result.written else 2


def _report(args: argparse.Namespace) -> int:
    from ti_trainer.prepare.captions import dataset_captions
    from ti_trainer.prepare.lint import duplicate_findings, lint_dataset
    from ti_trainer.prepare.report import build_report
    from ti_trainer.prepare.report_format import lint_text, report_json, report_text

    bar, progress = _progress_bar()
    try:
        report = build_report(args.folder, args.size, args.max_batch, progress)
    finally:
        bar.close()
    lint = lint_dataset(
        dataset_captions(args.folder), args.init_text, _token_budget(args), check_duplicates=False
    )
    lint.findings += duplicate_findings(report.near_duplicates)  # already found by the report
    if args.json:
        print(report_json(report, lint))
    else:
        print(report_text(report))
        print(lint_text(lint))
    return 0


def _progress_bar():
    """A bar on stderr (stdout stays the result) and the (done, total, what) callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(dynamic_ncols=True, file=sys.stderr)

    def progress(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(what)
        bar.refresh()

    return bar, progress


def _token_budget(args: argparse.Namespace):
    if not args.model:
        return None
    from ti_trainer.backends.loading import load_backend
    from ti_trainer.config import TrainConfig
    from ti_trainer.prepare.lint import TokenBudget, token_counter
    from ti_trainer.text.templates import read_template
    from ti_trainer.training.setup import find_template

    template = read_template(find_template(TrainConfig(template=args.template)))
    backend = load_backend(args.model, "cpu")
    chunker = backend.prompt_encoder.chunker
    return TokenBudget(template.lines, args.name, token_counter(chunker, args.name, args.vectors))
