"""`python -m ti_trainer estimate`: the memory a training step needs, by batch and checkpointing, no GPU used.

    python -m ti_trainer estimate --model sd21-768 --batch 1 2 4 8 12
    python -m ti_trainer estimate --model sdxl --lend-text-encoders --budget 7.5
    python -m ti_trainer estimate --model sd21-768 --a1111        # what A1111's own trainer would need
    python -m ti_trainer estimate --model v2-1_768.safetensors --probe   # on a GPU: measured with real steps

Nothing heavy is imported until the verb runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

CHECKPOINTING = ("auto", "off", "high-res", "all")


def add_estimate_verb(verbs) -> None:
    verb = verbs.add_parser(
        "estimate",
        help="estimate the GPU memory of a training step (no GPU needed) and the largest batch that fits",
    )
    verb.add_argument(
        "--model",
        default="sd21-768",
        help="a named architecture (sd15, sd21-base, sd21-768, sdxl), a model path, or a built-in tiny model ('tiny', 'tiny-sdxl'; default sd21-768)",
    )
    verb.add_argument("--width", type=int, help="training width in px (default: the model's native size)")
    verb.add_argument("--height", type=int, help="training height in px (default: the width)")
    verb.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes for the table")
    verb.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    verb.add_argument("--attention", choices=("sdpa", "xformers", "math"), default="sdpa")
    verb.add_argument(
        "--checkpointing", choices=CHECKPOINTING, default="auto", help="auto: a column for each level"
    )
    verb.add_argument(
        "--upcast-attention",
        choices=("auto", "on", "off"),
        default="auto",
        help="fp32 attention (auto: under fp16, when the model asks for it, as SD 2.1-768 does)",
    )
    verb.add_argument(
        "--budget", type=float, default=7.5, help="GiB PyTorch may use (default 7.5: an 8 GB card)"
    )
    verb.add_argument("--vae-on-gpu", action="store_true", help="the VAE's weights stay on the GPU")
    verb.add_argument("--text-encoder-on-cpu", action="store_true", help="the text encoder(s) run on the CPU")
    verb.add_argument(
        "--lend-text-encoders",
        action="store_true",
        help="SDXL: the text encoders wait in RAM and come to the GPU only for their forward and backward",
    )
    verb.add_argument("--fp8", action="store_true", help="linear and conv weights stored in fp8")
    verb.add_argument("--vectors", type=int, default=1, help="vectors per token of the embedding")
    verb.add_argument(
        "--probe",
        action="store_true",
        help="on a GPU, also find the largest batch with real training steps on the model (the fit finder, "
        "starting from the estimate); --model must then be a model file or folder, 'tiny' or 'tiny-sdxl'",
    )
    verb.add_argument("--device", default="auto", help="for --probe: auto, cuda, cuda:1 ...")
    verb.add_argument(
        "--a1111",
        action="store_true",
        help="A1111's own trainer: fp16, plain attention, every block checkpointed, UNet trainable, VAE on GPU",
    )


def run_estimate(args: argparse.Namespace) -> int:
    import dataclasses

    from ti_trainer.vram.architectures import ALIASES, ARCHITECTURES, architecture_of_backend
    from ti_trainer.vram.estimate import GIB, Settings, a1111_settings, largest_batch
    from ti_trainer.vram.for_config import CHECKPOINTING_WORDS, cached_estimate

    key = ALIASES.get(args.model.lower(), args.model.lower())
    if key in ARCHITECTURES:
        architecture = ARCHITECTURES[key]
    else:
        from ti_trainer.backends.loading import load_backend

        architecture = architecture_of_backend(load_backend(args.model, "cpu"))
    width = args.width or architecture.native_px
    height = args.height or width
    if args.a1111:
        settings = a1111_settings(width, height)
    else:
        upcast = args.upcast_attention == "on" or (
            args.upcast_attention == "auto"
            and args.precision == "fp16"
            and bool(architecture.unet.get("upcast_attention", False))
        )
        settings = Settings(
            width=width,
            height=height,
            precision=args.precision,
            attention=args.attention,
            upcast_attention=upcast,
            half_weights=args.precision != "fp32",
            fp8_weights=args.fp8,
            vae_on_gpu=args.vae_on_gpu,
            text_encoder_on_gpu=not (args.text_encoder_on_cpu or args.lend_text_encoders),
            text_encoders_lent=args.lend_text_encoders and not args.text_encoder_on_cpu,
            num_vectors=args.vectors,
        )
    if args.a1111 or args.checkpointing != "auto":
        levels = (settings.checkpointing if args.a1111 else args.checkpointing,)
    else:
        levels = ("off", "high-res", "all")
    budget = int(args.budget * GIB)
    print(f"{architecture.title} at {width}x{height} px: {describe(settings)}")
    print(f"GiB needed per step (allocator-rounded peak plus allowances; budget {args.budget:g} GiB):")
    print("| batch | " + " | ".join(f"checkpointing {level}" for level in levels) + " |")
    print("|---" * (len(levels) + 1) + "|")
    known: dict[str, dict[int, object]] = {level: {} for level in levels}
    weights = None
    for batch in sorted(set(args.batch)):
        cells = []
        for level in levels:
            estimate = cached_estimate(
                architecture, dataclasses.replace(settings, batch=batch, checkpointing=level)
            )
            known[level][batch] = estimate
            weights = estimate.weights_bytes
            cells.append(f"{estimate.needed_gib:.2f}" + ("" if estimate.fits(budget) else " (over)"))
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)
    print(f"Weights on the GPU: {weights / GIB:.2f} GiB.")
    best = None
    for level in levels:
        batch, estimate = largest_batch(
            architecture, dataclasses.replace(settings, checkpointing=level), budget, known=known[level]
        )
        if batch and (best is None or batch > best[0]):
            best = batch, estimate
    if best is None:
        print(f"Largest batch under {args.budget:g} GiB: none; even batch 1 needs more.")
        return 0
    batch, estimate = best
    words = CHECKPOINTING_WORDS[estimate.settings.checkpointing]
    print(
        f"Largest batch under {args.budget:g} GiB: {batch} {words} "
        f"(about {estimate.needed_gib:.2f} GiB; peak allocated {estimate.allocated_bytes / GIB:.2f} GiB)."
    )
    return probe(args, width, height) if args.probe else 0


def probe(args: argparse.Namespace, width: int, height: int) -> int:
    """The fit finder on the real model: the largest batch found with real training steps on this GPU."""
    from ti_trainer.backends.loading import load_backend
    from ti_trainer.config import TrainConfig
    from ti_trainer.training.fit import find_largest_batch

    backend = load_backend(args.model, args.device)
    if backend.device.type != "cuda":
        print(
            f"error: --probe measures GPU memory with real steps, and the model is on {backend.device}. "
            "Run it on a machine with a CUDA GPU (or leave --probe out: the estimate above needs none).",
            file=sys.stderr,
        )
        return 2
    config = TrainConfig(
        width=width,
        height=height,
        precision=args.precision,
        attention=args.attention,
        gradient_checkpointing=args.checkpointing,
        upcast_attention=args.upcast_attention,
        lend_text_encoders="on" if args.lend_text_encoders else "auto",
    )
    print("Measured on this GPU (" + torch_device_name(backend.device) + "):", flush=True)
    print(find_largest_batch(config, backend, num_vectors=args.vectors).describe())
    return 0


def torch_device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


def describe(settings) -> str:
    parts = [
        {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "fp32": "fp32"}[settings.precision],
        "weights in fp8"
        if settings.fp8_weights
        else f"weights in {str(settings.weights_dtype).split('.')[-1]}",
        {"sdpa": "SDPA", "xformers": "xformers", "math": "plain (math)"}[settings.attention]
        + " attention"
        + (" in fp32" if settings.upcast_attention else ""),
        "VAE on the GPU" if settings.vae_on_gpu else "VAE in RAM",
        "text encoder lent to the GPU for its forward and backward"
        if settings.text_encoders_lent
        else "text encoder on the GPU"
        if settings.text_encoder_on_gpu
        else "text encoder on the CPU",
    ]
    if settings.trainable_unet:
        parts.append("UNet trainable (weight gradients kept)")
    return ", ".join(parts)
