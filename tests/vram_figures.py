"""The VRAM estimate's figures for a few settings, recorded under the core venv's libraries, so that a test
run under the WebUIs' pins (tests/ui, A1111's diffusers 0.27 / transformers 4.30; Forge's 0.31 / 4.46) can
check it counts the same step. The panel's estimate runs in the WebUI's own Python, on those libraries.

When the estimate changes on purpose, print the figures under the core venv and paste them into RECORDED:
    PYTHONPATH=$PWD .venv/bin/python tests/vram_figures.py
(tests/test_memory_estimate.py checks RECORDED is what the core venv computes).
"""

from __future__ import annotations

import dataclasses
import pprint

from ti_trainer.vram.architectures import SD_VAE, Architecture
from ti_trainer.vram.estimate import Settings, a1111_settings, estimate_step_bytes

# A small SD-shaped model (two attention levels, linear projections, a CLIP text encoder) whose step at
# 384 px, batch 2 holds ~180 MB of activations: far above the measurement's noise, and quick on a CPU.
SMALL = Architecture(
    name="small",
    title="small",
    unet=dict(
        sample_size=48,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=256,
        use_linear_projection=True,
        norm_num_groups=32,
    ),
    text_encoders=(
        dict(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    vae=dict(SD_VAE, block_out_channels=(32, 32, 32, 32), norm_num_groups=8),
)

_BF16 = Settings(width=256, height=256, batch=2, precision="bf16")
# name -> (model, settings). "text encoder on the CPU" cases leave out the one part whose memory differs
# between the pins on purpose (see TEXT_ENCODER_ATTENTION); the others include it.
CASES: dict[str, tuple[object, Settings]] = {
    "small, bf16, no checkpointing": (SMALL, _BF16),
    "small, bf16, high-res blocks checkpointed": (
        SMALL,
        dataclasses.replace(_BF16, checkpointing="high-res"),
    ),
    "small, bf16, every block checkpointed": (SMALL, dataclasses.replace(_BF16, checkpointing="all")),
    "small, fp16, fp32 scores, every block checkpointed": (
        SMALL,
        dataclasses.replace(
            _BF16, precision="fp16", attention="math", upcast_attention=True, checkpointing="all"
        ),
    ),
    "small, A1111's own trainer (UNet trainable)": (SMALL, a1111_settings(256, 256, 2)),
    "small, bf16, every block checkpointed, text encoder on the CPU": (
        SMALL,
        dataclasses.replace(_BF16, checkpointing="all", text_encoder_on_gpu=False),
    ),
    "small, fp32 weights under bf16 autocast, high-res, text encoder on the CPU": (
        SMALL,
        dataclasses.replace(_BF16, half_weights=False, checkpointing="high-res", text_encoder_on_gpu=False),
    ),
    "SD 2.1-768-v, batch 2 at 768 px, every block checkpointed": (
        "sd21-768",
        Settings(width=768, height=768, batch=2, checkpointing="all"),
    ),
}

# transformers before 4.41 has only the eager attention for CLIP (the scores held for the backward pass);
# later versions default to SDPA, counted as a memory-efficient kernel. That is the one difference in what
# the step holds between the pins, and a real one (A1111's SD 1.x text encoder runs eager): under A1111's
# pins the figures here are 0.4% to 0.9% higher; Forge's pins give the core venv's to the byte.
TEXT_ENCODER_ATTENTION = 0.02

# Allocated bytes (weights + the step's peak), under the core venv (torch 2.13, diffusers 0.42.1,
# transformers 5.23.0).
RECORDED: dict[str, int] = {
    "small, bf16, no checkpointing": 86280192,
    "small, bf16, high-res blocks checkpointed": 67201024,
    "small, bf16, every block checkpointed": 47988224,
    "small, fp16, fp32 scores, every block checkpointed": 90951168,
    "small, A1111's own trainer (UNet trainable)": 111913984,
    "small, bf16, every block checkpointed, text encoder on the CPU": 43565056,
    "small, fp32 weights under bf16 autocast, high-res, text encoder on the CPU": 111653376,
    "SD 2.1-768-v, batch 2 at 768 px, every block checkpointed": 3476592128,
}


def figures() -> dict[str, int]:
    """Each case's allocated bytes (what torch.cuda.max_memory_allocated would report) under this venv."""
    return {
        name: estimate_step_bytes(model, settings).allocated_bytes
        for name, (model, settings) in CASES.items()
    }


if __name__ == "__main__":
    pprint.pprint(figures(), sort_dicts=False, width=110)
