"""The room asked of Forge for a training step's backward pass: Forge's forward estimate x BACKWARD_FACTOR
against the VRAM estimate (backends/forge_loan.py `step_room`), on the CPU, nothing downloaded.

Two tables:

- `--real` (the core venv): the released architectures the estimate knows (SD 1.5, SD 2.1-768-v, SDXL), built
  on the meta device, at their usual sizes, batch 1 and 2, every checkpointing level, fp16 (Forge's usual
  computation dtype). "Factor" is Forge's `KModel.memory_required` (1.28 x batch x h x w x 2 bytes x 16384,
  its SDPA/xformers scaler) x BACKWARD_FACTOR; "estimate" is `vram/for_config.py step_room_bytes`: the step's
  allocator-rounded peak beyond the weights plus the allocator's and the kernels' allowances.
- `--tiny` (the Forge venv, with the stand-in of tests/forge on the path): the tests' tiny Forge SD 2.x and
  SDXL, a real training step on the CPU (text encoders, UNet, backward to the vectors) with its bytes tallied
  (vram/tally.py `LiveBytes`, weights not counted), against the factor at fp32 (the stand-in's dtype). The
  estimate knows no tiny architecture by name, so it refuses them and the factor stands in.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_forge_room.py --real [sd15 sd21-768 sdxl]
    PYTHONPATH=$PWD .venv-forge/bin/python benchmarks/bench_forge_room.py --tiny
See docs/benchmarks.md for the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 1024 * 1024
LEVELS = ("off", "high-res", "all")
REAL = {
    "sd15": ("sd1", 768, "eps", (512, 768)),
    "sd21-768": ("sd2", 1024, "v", (768,)),
    "sdxl": ("sdxl", 2048, "eps", (1024,)),
}


def forge_forward(latent_shape, dtype_size: int) -> float:
    """Forge's KModel.memory_required with SDPA or xformers (backend/modules/k_model.py)."""
    batch, _, height, width = latent_shape
    return 1.28 * batch * height * width * dtype_size * 16384


def real_table(names: list[str]) -> None:
    from types import SimpleNamespace

    from ti_trainer.backends.contract import sd_family, sdxl_family
    from ti_trainer.backends.forge_memory import backward_bytes
    from ti_trainer.memory.plan import MemoryPlan
    from ti_trainer.vram.for_config import step_room_bytes

    print(
        "| architecture | px | batch | checkpointing | factor (MiB) | estimate (MiB) | estimate / factor | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        family_name, width, parameterization, sizes = REAL[name]
        family = sdxl_family() if family_name == "sdxl" else sd_family(family_name, width)
        backend = SimpleNamespace(
            text_width=width, family=family, schedule=SimpleNamespace(parameterization=parameterization)
        )
        for px in sizes:
            for batch in (1, 2):
                shape = (batch, 4, px // 8, px // 8)
                for level in LEVELS:
                    plan = MemoryPlan(
                        checkpointing=level, vae_offload=True, precision="fp16", half_weights=True
                    )
                    start = time.perf_counter()
                    room = step_room_bytes(plan, shape, backend)
                    seconds = time.perf_counter() - start
                    factor = backward_bytes(forge_forward(shape, 2), level)
                    print(
                        f"| {name} | {px} | {batch} | {level} | {factor / MIB:.0f} | {room / MIB:.0f} | "
                        f"{room / factor:.2f} | {seconds:.1f} |",
                        flush=True,
                    )


def tiny_table() -> None:
    here = Path(__file__).resolve().parents[1] / "tests" / "forge"
    sys.path[:0] = [str(here / "standin"), str(here)]
    import tiny_forge
    from backend import memory_management
    from modules import sd_models, shared

    from ti_trainer.backends.forge_backend import ForgeBackend
    from ti_trainer.backends.forge_memory import backward_bytes
    from ti_trainer.backends.forge_xl_backend import ForgeXLBackend
    from ti_trainer.memory.plan import MemoryPlan
    from ti_trainer.vram.tally import LiveBytes

    torch.set_num_threads(1)
    print(
        "| tiny Forge model | px | batch | checkpointing | factor (MiB) | measured step (MiB) | factor / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        embeddings = Path(folder) / "embeddings"
        embeddings.mkdir()
        vars(shared.cmd_opts).update(vars(shared.default_cmd_opts(embeddings_dir=str(embeddings))))
        for family, prediction in (("sd2", "v_prediction"), ("sdxl", "epsilon")):
            checkpoint = tiny_forge.write_tiny_checkpoint(Path(folder) / family, family, prediction)
            sd_models.model_data.__init__()
            sd_models.model_data.forge_loading_parameters = {
                "checkpoint_info": sd_models.CheckpointInfo(checkpoint, "0" * 64)
            }
            model = sd_models.forge_model_reload()[0]
            kind = ForgeXLBackend if family == "sdxl" else ForgeBackend
            backend = kind(model, memory_management)
            name = "tinyroom"
            backend.prompt_encoder.chunker.register(name, 1)
            start = backend.token_vectors("red")
            vectors = {k: v[:1] for k, v in start.items()} if isinstance(start, dict) else start[:1]
            for px in (64, 128, 256):
                for batch in (1, 2):
                    shape = (batch, 4, px // 8, px // 8)
                    for level in LEVELS:
                        trained = (
                            {k: v.clone().requires_grad_(True) for k, v in vectors.items()}
                            if isinstance(vectors, dict)
                            else vectors.clone().requires_grad_(True)
                        )
                        with (
                            backend.training_session(),
                            backend.memory_levers(MemoryPlan(checkpointing=level)),
                        ):
                            latents = torch.randn(shape)
                            tally = LiveBytes()
                            with tally:
                                cond = backend.prompt_encoder([f"a photo of {name}"] * batch, {name: trained})
                                out = backend.predict(latents, torch.tensor([500] * batch), cond)
                                out.float().pow(2).mean().backward()
                                del cond, out
                        factor = backward_bytes(forge_forward(shape, 4), level)
                        print(
                            f"| {family} | {px} | {batch} | {level} | {factor / MIB:.1f} | "
                            f"{tally.peak_rounded / MIB:.1f} | {factor / tally.peak_rounded:.0f} |",
                            flush=True,
                        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", nargs="*", help="released architectures (default: all three)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny Forge models (the Forge venv)")
    args = parser.parse_args()
    if args.real is not None:
        real_table(args.real or list(REAL))
    if args.tiny:
        tiny_table()


if __name__ == "__main__":
    main()
