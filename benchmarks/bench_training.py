"""Training speed and memory: our trainer against what A1111's and diffusers' trainers do, on one GPU.

SD 2.1-768-v and SD 2.1-base architectures with random weights built from their real configs (speed and
memory do not depend on the weights, so nothing is downloaded), at 768 and 512 px, a batch sweep, under an
8 GiB cap (torch.cuda.set_per_process_memory_fraction) and uncapped. Configurations, in the same run:

- ours: this package's backend and memory plan (frozen weights stored in bf16/fp16, SDPA, the VAE in RAM,
  checkpointing raised only as far as the batch needs, by fit.checkpointing_by_need).
- a1111: what A1111's built-in trainer does (reference/a1111.md §1.5, §2): fp16 weights with the UNet left
  trainable (its weight gradients computed and kept), plain math attention without upcast, fp16 autocast with
  a GradScaler, every UNet block checkpointed, the VAE on the GPU.
- diffusers-example: diffusers' textual_inversion.py: the whole token-embedding matrix in AdamW (plus its
  saved copy), an fp32 text encoder, the UNet and VAE in the half dtype, the VAE encoding every step, SDPA.

Reported per row: peak allocated and reserved memory, images/s, and utilisation: the necessary FLOPs (4.3
TFLOP per image per step at 768 px: UNet forward plus the input-gradient backward, reference/peers.md §3.2;
scaled by latent area for other sizes) over the bf16 matmul rate measured on the same GPU.

    python benchmarks/bench_training.py --json runs/bench.json           # the full run, on a GPU
    python benchmarks/bench_training.py --tiny                           # the same code, tiny model, CPU
See docs/benchmarks.md for the commands and the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ti_trainer.backends.clip_bpe import tiny_tokenizer  # noqa: E402
from ti_trainer.backends.diffusers_backend import DiffusersBackend  # noqa: E402
from ti_trainer.backends.diffusers_memory import attention_processors, unet_checkpointing  # noqa: E402
from ti_trainer.diffusion import noisy_latents_and_target, scaled_linear_schedule  # noqa: E402
from ti_trainer.memory.plan import MemoryPlan, choose_memory_plan  # noqa: E402
from ti_trainer.memory.precision import autocast, grad_scaler, resolve_precision  # noqa: E402
from ti_trainer.text.conditioning import TokenIds  # noqa: E402
from ti_trainer.training import fit  # noqa: E402
from ti_trainer.training.step import step_loss  # noqa: E402
from ti_trainer.vram import architectures  # noqa: E402

GIB = 1024**3
CONFIGS = ("ours", "a1111", "diffusers-example")
TFLOP_PER_IMAGE_768 = 4.3  # UNet forward + input-gradient backward, batch 1, 96x96 latent
NAME, VECTORS = "benchvectors", 8
PROMPT = f"a painting of {NAME}, oil on canvas, richly textured, by a master, in a museum"

# SD 2.1's UNet (stabilityai/stable-diffusion-2-1 unet/config.json; 2.1-base differs in sample size and in
# not asking for upcast attention), OpenCLIP-H's text tower as diffusers stores it (23 layers) and the SD VAE:
# the published configs the memory estimate builds its named architectures from.
SD21_UNET, OPENCLIP_H_TEXT, SD_VAE = architectures.SD21_UNET, architectures.OPENCLIP_H, architectures.SD_VAE
ARCHITECTURES = {
    "sd21-768-v": dict(parameterization="v", upcast=True),
    "sd21-base": dict(parameterization="eps", upcast=False),
}


@dataclass(eq=False)  # hashable by identity (the FLOP count is cached per model)
class Parts:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    parameterization: str
    penultimate: bool  # the tiny model reads its penultimate layer; diffusers' SD 2.x stores 23 layers


@dataclass
class Row:
    config: str
    arch: str
    size_px: int
    batch: int
    cap_gib: float | None
    status: str  # "ok" | "oom" | "skipped"
    checkpointing: str = ""
    precision: str = ""
    tflop_per_image: float | None = None
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    seconds_per_step: float | None = None
    images_per_s: float | None = None
    achieved_tflops: float | None = None
    utilisation: float | None = None
    # The no-GPU estimate (ti_trainer/vram) of the same step's peak allocated memory, to set beside
    # peak_allocated_gib (torch.cuda.max_memory_allocated); ours and a1111 only.
    estimated_allocated_gib: float | None = None
    note: str = ""


def build_parts(arch: str, device: torch.device) -> Parts:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch == "tiny":
        from ti_trainer.backends.tiny import build_tiny_components

        unet, vae, text_encoder, _ = build_tiny_components("v")
        return Parts(unet.to(device), vae.to(device), text_encoder.to(device), "v", True)
    spec = ARCHITECTURES[arch]
    with torch.device(device):  # built where they run: random init on the GPU takes a second
        unet = UNet2DConditionModel(**{**SD21_UNET, "upcast_attention": spec["upcast"]})
        vae = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT))
    return Parts(unet, vae, text_encoder, spec["parameterization"], False)


@functools.cache
def counted_tflop_per_image(size_px: int, parts: Parts) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    latent = size_px // 8
    sample = torch.zeros(1, 4, latent, latent, device=parts.unet.device)
    context = torch.zeros(1, 77, parts.text_encoder.config.hidden_size, device=parts.unet.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        parts.unet(sample, torch.tensor([1], device=sample.device), encoder_hidden_states=context)
    return 2 * counter.get_total_flops() / 1e12


def tflop_per_image(arch: str, size_px: int, parts: Parts) -> float:
    """Necessary TFLOP per image per step: 4.3 at 768 px scaled by latent area; the tiny model is counted."""
    if arch != "tiny":
        return TFLOP_PER_IMAGE_768 * (size_px / 768) ** 2
    return counted_tflop_per_image(size_px, parts)


def matmul_tflops(device: torch.device, tiny: bool) -> float:
    """The bf16 matmul rate this device reaches (the yardstick for utilisation)."""
    n = 256 if tiny or device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats, started = 0, time.perf_counter()
    while repeats < 10 or time.perf_counter() - started < 0.5:  # half a second of products at least
        for _ in range(10):
            a @ b
        repeats += 10
        synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def memory_cap(device: torch.device, cap_gib: float | None):
    if device.type != "cuda" or cap_gib is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# --- the three configurations: each gives a step(batch, latent) and the plan in words --------------------


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return torch.nn.Module.to(module, dtype)  # (diffusers' own .to() warns about casting on every call)


def token_ids() -> tuple[Callable, TokenIds]:
    tokenizer = tiny_tokenizer()
    return tokenizer, TokenIds(tokenizer.start_id, tokenizer.end_id, 0, tokenizer.comma_id)


def make_backend(parts: Parts, device: torch.device) -> DiffusersBackend:
    tokenizer, ids = token_ids()
    backend = DiffusersBackend(
        parts.unet,
        parts.vae,
        parts.text_encoder,
        tokenizer,
        ids,
        scaled_linear_schedule(parts.parameterization),
        penultimate=parts.penultimate,
        model_name="bench",
        device=device,
    )
    backend.prompt_encoder.chunker.register(NAME, VECTORS)
    return backend


def backward_and_step(loss: torch.Tensor, optimizer, scaler) -> None:
    if scaler:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # (our loop unscales before clipping; the cost is the same either way)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def embedding_step(backend: DiffusersBackend, precision: str, uses_scaler: bool, device: torch.device):
    """The loop's step (training/step.py `step_loss`, as training/loop.py calls it): vectors injected into the
    prompt, UNet, loss; then AdamW on the vectors."""
    vectors = torch.zeros(VECTORS, backend.text_width, device=device, requires_grad=True)
    optimizer = torch.optim.AdamW([vectors], lr=5e-3, weight_decay=0.0)
    scaler = grad_scaler(precision, device) if uses_scaler else None
    channels = backend.family.latent_channels

    def step(batch: int, latent: int) -> None:
        latents = torch.randn(batch, channels, latent, latent, device=device)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, backend.schedule.num_timesteps, (batch,), device=device)
        loss = step_loss(
            backend, [PROMPT] * batch, latents, noise, timesteps, None, {NAME: vectors}, precision
        )
        backward_and_step(loss, optimizer, scaler)

    return step


@contextlib.contextmanager
def ours(parts: Parts, device: torch.device, batch: int, latent: int):
    plan = choose_memory_plan(device, model_upcasts_attention=parts.unet.config.upcast_attention)
    if plan.weights_dtype is not None:
        # As a half-precision loader would load them; the lever that converts fp32 weights for the run (and
        # keeps the originals in RAM) then has nothing to do, instead of copying 5 GB for every row.
        cast(parts.unet, plan.weights_dtype)
        cast(parts.text_encoder, plan.weights_dtype)
    backend = make_backend(parts, device)
    if device.type == "cuda":
        plan = fit.checkpointing_by_need(backend, plan, batch, (latent, latent), VECTORS)
        if plan is None:
            raise torch.cuda.OutOfMemoryError("no checkpointing level fits this batch")
    with backend.memory_levers(plan):
        yield embedding_step(backend, plan.precision, True, device), plan


@contextlib.contextmanager
def a1111(parts: Parts, device: torch.device, batch: int, latent: int):
    half = torch.float16 if device.type == "cuda" else torch.float32  # model.half(); the CPU has no fp16 path
    for module in (parts.unet, parts.vae, parts.text_encoder):
        cast(module, half)
    backend = make_backend(parts, device)  # freezes everything...
    parts.unet.requires_grad_(True)  # ...but A1111 leaves its UNet trainable: weight gradients, every step
    precision = "fp16" if device.type == "cuda" else "fp32"
    plan = MemoryPlan("math", "all", False, precision, False, False)
    try:
        with attention_processors(parts.unet, "math", False), unet_checkpointing(parts.unet, "all"):
            yield embedding_step(backend, precision, True, device), plan
    finally:
        parts.unet.requires_grad_(False)
        for parameter in parts.unet.parameters():
            parameter.grad = None


@contextlib.contextmanager
def diffusers_example(parts: Parts, device: torch.device, batch: int, latent: int):
    precision = resolve_precision("auto", device)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    cast(parts.unet, weight_dtype).requires_grad_(False)
    cast(parts.vae, weight_dtype).requires_grad_(False)
    text_encoder = cast(parts.text_encoder, torch.float32).requires_grad_(False)
    embedding = text_encoder.get_input_embeddings()
    embedding.weight.requires_grad_(True)  # the whole matrix, as the example trains it
    original_rows = embedding.weight.data.clone()
    optimizer = torch.optim.AdamW([embedding.weight], lr=5e-4, weight_decay=1e-2)
    scaler = grad_scaler(precision, device)
    schedule = scaled_linear_schedule(parts.parameterization)
    config = text_encoder.config
    rows = embedding.weight.shape[0]
    placeholder = next(
        i for i in (rows - 1, rows - 2, rows - 3) if i not in (config.bos_token_id, config.eos_token_id)
    )
    ids = [config.bos_token_id, *range(1, 20), placeholder, config.eos_token_id]
    input_ids = torch.tensor(ids + [0] * (77 - len(ids)), device=device)
    keep = torch.ones(embedding.weight.shape[0], dtype=torch.bool, device=device)
    keep[placeholder] = False
    plan = MemoryPlan("sdpa", "off", False, precision, False, False)

    def step(batch: int, latent: int) -> None:
        pixels = torch.randn(batch, 3, latent * 8, latent * 8, device=device, dtype=weight_dtype)
        latents = parts.vae.encode(pixels).latent_dist.sample().float() * 0.18215  # every step
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, schedule.num_timesteps, (batch,), device=device)
        noisy, target = noisy_latents_and_target(schedule, latents, noise, timesteps)
        with autocast(precision, device):
            states = text_encoder(input_ids.expand(batch, -1), output_hidden_states=parts.penultimate)
            cond = states.hidden_states[-2] if parts.penultimate else states[0]
        prediction = parts.unet(noisy.to(weight_dtype), timesteps, cond.to(weight_dtype)).sample
        backward_and_step(torch.nn.functional.mse_loss(prediction.float(), target.float()), optimizer, scaler)
        with torch.no_grad():  # only the placeholder row may change
            embedding.weight[keep] = original_rows[keep]

    try:
        with attention_processors(parts.unet, "sdpa", False), attention_processors(parts.vae, "sdpa", False):
            yield step, plan
    finally:
        embedding.weight.requires_grad_(False)
        embedding.weight.grad = None


SETUPS = {"ours": ours, "a1111": a1111, "diffusers-example": diffusers_example}


def estimated_allocated_gib(parts: Parts, config: str, plan: MemoryPlan, size_px: int, batch: int):
    """The estimate of the step just measured, from the same configs, on the meta device (None for the
    diffusers example, whose whole-matrix AdamW the estimate does not model)."""
    from ti_trainer.vram.architectures import Architecture
    from ti_trainer.vram.estimate import Settings, a1111_settings, estimate_step_bytes

    if config == "diffusers-example":
        return None
    architecture = Architecture(
        name=config,
        title=config,
        unet=dict(parts.unet.config),
        text_encoders=(parts.text_encoder.config.to_dict(),),
        vae=dict(parts.vae.config),
        text_layer="penultimate+norm" if parts.penultimate else "last",
    )
    half = plan.precision != "fp32"
    if config == "a1111":
        settings = dataclasses.replace(
            a1111_settings(size_px, size_px, batch), precision=plan.precision, half_weights=half
        )
    else:
        settings = Settings(
            width=size_px,
            height=size_px,
            batch=batch,
            precision=plan.precision,
            attention=plan.attention,
            checkpointing=plan.checkpointing,
            upcast_attention=plan.upcast_attention,
            half_weights=half,
            vae_on_gpu=not plan.vae_offload,
        )
    settings = dataclasses.replace(settings, num_vectors=VECTORS)
    return estimate_step_bytes(architecture, settings).allocated_bytes / GIB


def measure(
    parts: Parts, config: str, arch: str, size_px: int, batch: int, cap_gib, device, args, yardstick
) -> Row:
    row = Row(config, arch, size_px, batch, cap_gib, "ok")
    latent = size_px // 8
    out_of_memory = False
    free(device)
    try:
        with memory_cap(device, cap_gib):
            flops = row.tflop_per_image = tflop_per_image(arch, size_px, parts)
            with SETUPS[config](parts, device, batch, latent) as (step, plan):
                row.checkpointing, row.precision = plan.checkpointing, plan.precision
                for _ in range(args.warmup):
                    step(batch, latent)
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.perf_counter()
                for _ in range(args.steps):
                    step(batch, latent)
                synchronize(device)
                seconds = (time.perf_counter() - started) / args.steps
            if device.type == "cuda":
                row.peak_allocated_gib = torch.cuda.max_memory_allocated(device) / GIB
                row.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
            row.estimated_allocated_gib = estimated_allocated_gib(parts, config, plan, size_px, batch)
            row.seconds_per_step = seconds
            row.images_per_s = batch / seconds
            row.achieved_tflops = row.images_per_s * flops
            row.utilisation = row.achieved_tflops / yardstick
    except Exception as error:
        if not fit.is_out_of_memory(error):
            raise
        out_of_memory = True
        row.note = str(error).splitlines()[0][:120]
    if out_of_memory:
        row.status = "oom"
    free(device)
    return row


def run(args) -> dict:
    device = torch.device("cpu" if args.tiny else args.device)
    if args.tiny:
        args.archs, args.sizes, args.batches, args.caps = ["tiny"], [32], [1, 2], [None]
        args.steps, args.warmup = 1, 1
    torch.manual_seed(0)
    yardstick = matmul_tflops(device, args.tiny)
    rows = []
    for arch in args.archs:
        for config in args.configs:
            parts = build_parts(arch, device)  # once per configuration: each leaves it as it found it
            for size_px in args.sizes:
                for cap_gib in args.caps:
                    ran_out = False
                    for batch in args.batches:
                        if ran_out:  # a larger batch cannot fit where a smaller one did not
                            rows.append(Row(config, arch, size_px, batch, cap_gib, "skipped"))
                            continue
                        row = measure(parts, config, arch, size_px, batch, cap_gib, device, args, yardstick)
                        ran_out = row.status == "oom"
                        rows.append(row)
                        print(format_row(row), flush=True)
            del parts
            free(device)
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "bf16_matmul_tflops": yardstick,
        "tflop_per_image_768": TFLOP_PER_IMAGE_768,
        "command": " ".join(sys.argv),
        "rows": [asdict(row) for row in rows],
    }
    if args.min_cap and device.type == "cuda":
        report["smallest_cap_gib_sd21_base_512_batch1"] = smallest_cap(device, args)
    return report


def smallest_cap(device: torch.device, args) -> float | None:
    """The smallest cap (0.25 GiB steps) at which ours trains SD 2.1-base at 512 px, batch 1."""
    low, high = 0.5, 8.0  # high is known to fit (or nothing does)
    probe = argparse.Namespace(**{**vars(args), "steps": 2, "warmup": 1})
    parts = build_parts("sd21-base", device)

    def trains_at(cap_gib: float) -> bool:
        return measure(parts, "ours", "sd21-base", 512, 1, cap_gib, device, probe, 1.0).status == "ok"

    if not trains_at(high):
        return None
    while high - low > 0.25:
        middle = round((low + high) / 2 / 0.25) * 0.25
        if middle in (low, high):
            break
        low, high = (low, middle) if trains_at(middle) else (middle, high)
    return high


def format_row(row: Row) -> str:
    def number(value, pattern):
        return "" if value is None else pattern.format(value)

    cap = "none" if row.cap_gib is None else f"{row.cap_gib:g} GiB"
    return (
        f"| {row.config} | {row.arch} | {row.size_px} | {row.batch} | {cap} | {row.status} | {row.checkpointing} "
        f"| {row.precision} | {number(row.peak_allocated_gib, '{:.2f}')} "
        f"| {number(row.estimated_allocated_gib, '{:.2f}')} | {number(row.peak_reserved_gib, '{:.2f}')} "
        f"| {number(row.images_per_s, '{:.2f}')} | {number(row.utilisation, '{:.0%}')} |"
    )


TABLE_HEADER = (
    "| config | arch | px | batch | cap | status | checkpointing | precision | peak alloc GiB | estimated alloc GiB "
    "| peak reserved GiB | images/s | utilisation |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}, torch {report['torch']}, bf16 matmul {report['bf16_matmul_tflops']:.1f} TFLOP/s",
        "",
        TABLE_HEADER,
    ]
    lines += [format_row(Row(**row)) for row in report["rows"]]
    if "smallest_cap_gib_sd21_base_512_batch1" in report:
        lines += [
            "",
            f"Smallest cap for SD 2.1-base, 512 px, batch 1: {report['smallest_cap_gib_sd21_base_512_batch1']} GiB",
        ]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, in seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[768, 512])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 6, 8, 12, 16])
    parser.add_argument("--caps", nargs="+", default=["8", "none"], help="GiB caps ('none' = uncapped)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--min-cap", action="store_true", help="also find the smallest cap for 2.1-base 512 px"
    )
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    args.caps = [None if cap == "none" else float(cap) for cap in args.caps]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
