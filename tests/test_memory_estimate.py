"""The VRAM estimate (ti_trainer/vram): against a real step's measured memory on the CPU, in the
directions each lever must move it, and against the targets on the named architectures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ti_trainer.cli.main import main
from ti_trainer.config import TrainConfig
from ti_trainer.errors import UserError
from ti_trainer.vram.architectures import SD_VAE, Architecture
from ti_trainer.vram.estimate import GIB, Settings, a1111_settings, estimate_step_bytes, largest_batch
from ti_trainer.vram.for_config import estimate_for_config, summary

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2

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
FP32 = Settings(width=384, height=384, batch=2, precision="fp32", half_weights=False)
BF16 = Settings(width=384, height=384, batch=2, precision="bf16")
QUICK = Settings(width=128, height=128, batch=2, precision="bf16")  # where the size does not matter


def measured_step_bytes(architecture: Architecture, settings: Settings, levels: list[str]) -> dict[str, int]:
    """Peak resident memory a real CPU step adds, per checkpointing level, in a fresh process. Large blocks
    are mmapped and unmapped on free (glibc's threshold fixed low), so resident memory follows live memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    arguments = [json.dumps(dataclasses.asdict(architecture)), json.dumps(dataclasses.asdict(settings))]
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "measure_step_rss.py"), *arguments, *levels],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_estimate_is_within_10_percent_of_a_real_steps_measured_memory():
    measured = measured_step_bytes(SMALL, FP32, ["off", "all"])
    for level in ("off", "all"):
        estimate = estimate_step_bytes(SMALL, dataclasses.replace(FP32, checkpointing=level))
        assert measured[level] > 50 * MIB  # the measurement is far above the noise
        assert estimate.step_bytes_exact == pytest.approx(measured[level], rel=0.10), level
    assert measured["all"] < measured["off"] * 0.6  # the recomputation is really saving, and counted


def test_grows_with_the_batch_and_weights_are_counted_once():
    one, two, three = (estimate_step_bytes(SMALL, QUICK.with_batch(b)) for b in (1, 2, 3))
    assert one.needed_bytes < two.needed_bytes < three.needed_bytes
    assert one.weights_bytes == two.weights_bytes == three.weights_bytes
    # Activations are batch-sized: the step's bytes grow by about the same amount per image.
    assert (three.step_bytes - two.step_bytes) == pytest.approx(two.step_bytes - one.step_bytes, rel=0.05)


def test_checkpointing_lowers_the_peak():
    off, high_res, every = (
        estimate_step_bytes(SMALL, dataclasses.replace(QUICK, checkpointing=level))
        for level in ("off", "high-res", "all")
    )
    assert every.step_bytes < high_res.step_bytes < off.step_bytes


def test_bf16_weights_take_half_and_fp8_weights_a_quarter_of_fp32():
    fp32 = estimate_step_bytes(SMALL, dataclasses.replace(QUICK, half_weights=False)).weights_bytes
    bf16 = estimate_step_bytes(SMALL, QUICK).weights_bytes
    fp8 = estimate_step_bytes(SMALL, dataclasses.replace(QUICK, fp8_weights=True)).weights_bytes
    assert bf16 == pytest.approx(fp32 / 2, rel=0.02)
    assert fp32 / 4 < fp8 < fp32 * 0.3  # norms, biases and embeddings stay in bf16


def test_fp32_weights_under_autocast_hold_their_half_copies_for_the_backward_pass():
    half = estimate_step_bytes(SMALL, QUICK)
    full = estimate_step_bytes(SMALL, dataclasses.replace(QUICK, half_weights=False))
    # Frozen weights are cast at each use (autocast caches only trainable ones); a linear or conv whose input
    # needs a gradient keeps its bf16 copy for the backward pass: most of the model's weights, once more.
    assert full.step_bytes - half.step_bytes > 0.5 * half.weights_bytes


def test_plain_attention_holds_the_score_matrix_and_sdpa_does_not():
    sdpa = estimate_step_bytes(SMALL, BF16)
    math = estimate_step_bytes(SMALL, dataclasses.replace(BF16, attention="math"))
    tokens, heads = (384 // 8) ** 2, 2  # the first level's self-attention
    one_score_matrix = BF16.batch * heads * tokens**2 * 4  # the fp32 softmax output alone
    assert math.step_bytes - sdpa.step_bytes > one_score_matrix
    # SDPA's saved state grows with the tokens, not with their square: doubling the side about quadruples it.
    larger = estimate_step_bytes(SMALL, dataclasses.replace(BF16, width=768, height=768))
    assert larger.step_bytes < 5 * sdpa.step_bytes


def test_text_encoder_on_the_cpu_leaves_only_its_output_on_the_gpu():
    on_gpu = estimate_step_bytes(SMALL, QUICK)
    on_cpu = estimate_step_bytes(SMALL, dataclasses.replace(QUICK, text_encoder_on_gpu=False))
    assert on_cpu.weights_bytes < on_gpu.weights_bytes
    assert on_cpu.step_bytes < on_gpu.step_bytes  # its activations are in RAM
    with_vae = estimate_step_bytes(SMALL, dataclasses.replace(QUICK, vae_on_gpu=True))
    assert with_vae.weights_bytes > on_gpu.weights_bytes and with_vae.step_bytes == on_gpu.step_bytes


def test_largest_batch_is_the_last_that_fits():
    budget = estimate_step_bytes(SMALL, QUICK.with_batch(5)).needed_bytes + 1
    batch, estimate = largest_batch(SMALL, QUICK, budget)
    assert batch == 5 and estimate.fits(budget)
    assert not estimate_step_bytes(SMALL, QUICK.with_batch(6)).fits(budget)
    assert largest_batch(SMALL, QUICK, 1000) == (0, None)


# --- the targets, on the named architectures (estimates, not measurements) ------------------------------------


def test_sd21_768_trains_batch_8_at_768_px_in_7_5_gib_with_checkpointing():
    estimate = estimate_step_bytes("sd21-768", Settings(width=768, height=768, batch=8, checkpointing="all"))
    assert 2.2 * GIB < estimate.weights_bytes < 2.3 * GIB  # 866M + 340M parameters in bf16
    assert estimate.needed_bytes < 7.5 * GIB


def test_sd21_base_trains_batch_1_at_512_px_in_3_5_gib():
    estimate = estimate_step_bytes("sd21-base", Settings(width=512, height=512, batch=1, checkpointing="all"))
    assert estimate.needed_bytes < 3.5 * GIB


def test_sdxl_trains_batch_1_at_1024_px_in_7_5_gib():
    estimate = estimate_step_bytes("sdxl", Settings(width=1024, height=1024, batch=1, checkpointing="all"))
    assert 6.2 * GIB < estimate.weights_bytes < 6.4 * GIB  # 2.57G + 0.82G parameters in bf16
    assert estimate.needed_bytes < 7.5 * GIB


def test_a1111s_configuration_does_not_train_batch_1_at_768_px_in_8_gib():
    estimate = estimate_step_bytes("sd21-768", a1111_settings(768, 768, 1))
    assert estimate.needed_bytes > 8 * GIB
    ours = estimate_step_bytes("sd21-768", Settings(width=768, height=768, batch=1, checkpointing="all"))
    assert ours.needed_bytes < estimate.needed_bytes / 2


# --- wiring ---------------------------------------------------------------------------------------------------


def test_estimate_verb_prints_the_table_and_the_largest_batch(capsys):
    argv = ["estimate", "--model", "tiny", "--width", "64", "--batch", "1", "2", "--budget", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| batch | checkpointing off | checkpointing high-res | checkpointing all |" in out
    assert out.count("\n| 1 | ") == 1 and out.count("\n| 2 | ") == 1
    assert "Largest batch under 1 GiB: 64 without checkpointing" in out  # the tiny model fits the limit
    assert main([*argv, "--checkpointing", "all", "--budget", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "| batch | checkpointing all |" in out and "(over)" in out
    assert "Largest batch under 0.001 GiB: none; even batch 1 needs more." in out


def test_estimate_verb_names_unknown_models_clearly(capsys):
    assert main(["estimate", "--model", "sd9"]) == 2
    assert "Model not found: sd9" in capsys.readouterr().err


def test_config_estimate_and_its_summary(backend):
    config = TrainConfig(width=64, height=64, batch_size=2, gradient_checkpointing="auto")
    roomy = estimate_for_config(config, backend, budget_gib=1.0)
    assert roomy.settings.checkpointing == "off" and roomy.settings.precision == "bf16"
    tight_gib = estimate_for_config(config, backend, budget_gib=0.0).needed_gib  # fits nowhere: every block
    assert estimate_for_config(config, backend, budget_gib=0.0).settings.checkpointing == "all"
    assert tight_gib < roomy.needed_gib
    line = summary(roomy, 7.5)
    assert line.startswith("batch 2 fits in 8 GB at 64 px without checkpointing: about 0.")
    assert summary(roomy, 0.01).startswith("batch 2 does not fit in 0.01 GiB at 64 px")


def test_out_of_memory_message_names_the_estimate(backend, make_config):
    from tests.test_fit import allocation_limit, quiet
    from ti_trainer.training.loop import train

    config = make_config(batch_size=2, gradient_accumulation=1, max_steps=2)
    with allocation_limit(backend, max_batch=1), pytest.raises(UserError) as error:
        train(config, backend, quiet())
    message = str(error.value)
    assert "The estimate for this step was about 0." in message
    assert message.endswith("The embedding keeps its last saved step; start again to resume from it.")


def test_the_webuis_model_is_matched_to_its_named_architecture():
    from types import SimpleNamespace

    from ti_trainer.vram.architectures import architecture_of_backend

    def ldm(width: int, parameterization: str, family: str = "sd2"):  # a WebUI backend: no diffusers configs
        return SimpleNamespace(
            text_width=width,
            schedule=SimpleNamespace(parameterization=parameterization),
            family=SimpleNamespace(name=family),
        )

    assert architecture_of_backend(ldm(1024, "v")).unet["sample_size"] == 96  # SD 2.1-768-v
    assert architecture_of_backend(ldm(1024, "eps")).unet["sample_size"] == 64  # SD 2.1-base
    assert architecture_of_backend(ldm(768, "eps")).text_encoders[0]["hidden_size"] == 768  # SD 1.x
    assert architecture_of_backend(ldm(80, "eps", "sdxl")).name == "sdxl"  # the WebUI's SDXL, at any width


def test_estimate_probe_wants_a_gpu_and_says_so(capsys):
    """--probe runs the fit finder with real steps; off a GPU it says why it cannot, after the estimate."""
    argv = ["estimate", "--model", "tiny", "--width", "64", "--batch", "1", "--probe", "--device", "cpu"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Largest batch under 7.5 GiB" in captured.out
    assert "--probe measures GPU memory with real steps, and the model is on cpu" in captured.err
