"""A tiny SD 1.x / 2.x / SDXL checkpoint for the Forge stand-in, written to disk as Forge would find one.

The networks are the stand-in's (tests/forge/standin/backend/nn: the ldm-layout UNet with Forge's in-place
residual adds, transformers' CLIPTextModel inside IntegratedCLIP, diffusers' AutoencoderKL networks), built from
config with random weights made informative (ti_trainer.backends.tiny.make_random_init_informative), and
tokenized by transformers' CLIPTokenizer over the package's tiny CLIP vocabulary. The checkpoint is a
safetensors file with the usual prefixes and, beside it, the architecture guess the stand-in loader reads
(standin/backend/loader.py). Nothing is downloaded.

The tiny SDXL keeps SDXL's shape at a smaller width: CLIP-L 32 and bigG 48 wide (bigG's pooled output projected
48 -> 48), so crossattn is 80 wide; the vector is bigG's pooled 48 plus Forge's six size and crop numbers at 256
features each (its engine's `Timestep(256)`, kept as Forge has it), 48 + 1536 = 1584, the UNet's
`adm_in_channels`.
"""

import json
from pathlib import Path

import safetensors.torch
import torch

from ti_trainer.backends.clip_bpe import tiny_tokenizer
from ti_trainer.backends.tiny import make_random_init_informative

TEXT_WIDTH = 32
CLIP_G_WIDTH = 48
SDXL_SIZE_FEATURES = 6 * 256  # Forge's SDXL engine: Timestep(256) of six numbers
SEED = 1234


def text_encoder_config(tokenizer, width: int, act: str, pad_token_id: int) -> dict:
    return {
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": width,
        "intermediate_size": width * 2,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "bos_token_id": tokenizer.start_id,
        "eos_token_id": tokenizer.end_id,
        "pad_token_id": pad_token_id,
    }


def guess_for(family: str, prediction_type: str, tokenizer_dir: Path) -> dict:
    tokenizer = tiny_tokenizer()
    sd2, sdxl = family == "sd2", family == "sdxl"
    guess = {
        "family": family,
        "tokenizer_dir": str(tokenizer_dir),
        # SD 2.x (and SDXL's bigG) pad with "!" (id 0), SD 1.x and SDXL's CLIP-L with the end token
        "pad_token": "!" if sd2 else "<|endoftext|>",
        "text_encoder": text_encoder_config(
            tokenizer, TEXT_WIDTH, "gelu" if sd2 else "quick_gelu", 0 if sd2 else tokenizer.end_id
        ),
        "unet": {
            "in_channels": 4,
            "model_channels": 32,  # GroupNorm(32): multiples of 32
            "out_channels": 4,
            "num_res_blocks": 1,
            "channel_mult": [1, 2],
            "num_head_channels": 8,
            "context_dim": TEXT_WIDTH + CLIP_G_WIDTH if sdxl else TEXT_WIDTH,
            "use_linear_in_transformer": sd2 or sdxl,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 16, 16],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "sample_size": 64,
            "scaling_factor": 0.13025 if sdxl else 0.18215,
        },
        "scheduler": {
            "prediction_type": prediction_type,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "num_train_timesteps": 1000,
        },
    }
    if sdxl:
        guess["pad_token_2"] = "!"
        guess["text_encoder_2"] = text_encoder_config(tokenizer, CLIP_G_WIDTH, "gelu", 0)
        guess["unet"].update(num_classes="sequential", adm_in_channels=CLIP_G_WIDTH + SDXL_SIZE_FEATURES)
    return guess


def write_tiny_checkpoint(folder: Path, family: str = "sd2", prediction_type: str = "v_prediction") -> Path:
    """Write `<folder>/tiny-<family>.safetensors` ("sd1", "sd2" or "sdxl") and its guess; returns the
    checkpoint's path."""
    from backend.loader import GUESS_SUFFIX, prefixes_for
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer_dir = folder / "tokenizer"
    tiny_tokenizer().save_files(tokenizer_dir)
    guess = guess_for(family, prediction_type, tokenizer_dir)
    torch.manual_seed(SEED)
    parts = {
        "unet": IntegratedUNet2DConditionModel(**guess["unet"]),
        "vae": IntegratedAutoencoderKL(**guess["vae"]),
        "text_encoder": IntegratedCLIP(
            CLIPTextModel, CLIPTextConfig(**guess["text_encoder"]), add_text_projection=family == "sdxl"
        ),
    }
    if family == "sdxl":
        parts["text_encoder_2"] = IntegratedCLIP(
            CLIPTextModel, CLIPTextConfig(**guess["text_encoder_2"]), add_text_projection=True
        )
    prefixes = prefixes_for(family)
    generator = torch.Generator().manual_seed(SEED)
    state = {}
    for name, module in parts.items():
        make_random_init_informative(module, generator)
        state.update({prefixes[name] + key: value.contiguous() for key, value in module.state_dict().items()})
    path = folder / f"tiny-{family}.safetensors"
    safetensors.torch.save_file(state, str(path))
    Path(str(path) + GUESS_SUFFIX).write_text(json.dumps(guess), encoding="utf-8")
    return path
