"""A tiny real ldm `LatentDiffusion`, shaped like SD 2.x (v2-inference-v.yaml / v2-inference.yaml), built from
config with random weights: the classes A1111 runs (UNetModel with linear transformer projections,
AutoencoderKL, FrozenOpenCLIPEmbedder at its penultimate layer), at a size that trains in seconds on a CPU.

The text encoder is an open_clip model with a 32-wide, 3-layer text tower over open_clip's full 49408-token
vocabulary, so prompts are tokenized by the very tokenizer A1111 uses for SD 2.x (it ships inside open_clip; no
download). No pretrained weights are asked for (`version: None`), so nothing is downloaded.
"""

import json
from pathlib import Path

import open_clip
import torch
from ldm.util import instantiate_from_config
from omegaconf import OmegaConf

from ti_trainer.backends.tiny import make_random_init_informative

TEXT_WIDTH = 32
OPEN_CLIP_ARCH = "ti-trainer-tiny-text"


def register_tiny_open_clip(folder: Path) -> None:
    config = {
        "embed_dim": TEXT_WIDTH,
        # open_clip always builds a vision tower; ldm deletes it.
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 4, "layers": 3},
    }
    path = Path(folder) / f"{OPEN_CLIP_ARCH}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(path)


def tiny_sd2_config(parameterization: str = "v"):
    """The fields of A1111's v2-inference(-v).yaml, shrunk; use_checkpoint False as A1111's repair_config sets."""
    unet = {
        "use_checkpoint": False,
        "use_fp16": False,
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,  # ldm's GroupNorm has 32 groups: channels must be multiples of 32
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 8,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": TEXT_WIDTH,
        "legacy": False,
        "use_spatial_transformer": True,
    }
    vae = {
        "embed_dim": 4,
        "monitor": "val/rec_loss",
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],  # 8x downsampling, as in SD
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    text = {"arch": OPEN_CLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate", "device": "cpu"}
    params = {
        "parameterization": parameterization,
        "linear_start": 0.00085,
        "linear_end": 0.0120,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 8,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215,
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": vae},
        "cond_stage_config": {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": text,
        },
    }
    if parameterization == "eps":
        del params["parameterization"]  # v2-inference.yaml (512-base) leaves it at ldm's default
    return OmegaConf.create({"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params})


def build_tiny_sd2(parameterization: str = "v", seed: int = 1234):
    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_sd2_config(parameterization))
    make_random_init_informative(model, torch.Generator().manual_seed(seed))
    return model.eval()


def write_clip_vocabulary(folder: Path) -> tuple[dict, Path, Path]:
    """CLIP's BPE vocabulary and merges as transformers' CLIPTokenizer reads them (vocab.json, merges.txt),
    written out from the copy inside open_clip (the same BPE; no download). Returns (vocab, the two files)."""
    from open_clip.tokenizer import _tokenizer as bpe

    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges), encoding="utf-8")
    return vocab, vocab_file, merges_file


def tiny_sd1_text_encoder(folder: Path, seed: int = 1234):
    """ldm's FrozenCLIPEmbedder as SD 1.x has it: a tiny transformers CLIPTextModel, and a CLIPTokenizer over
    CLIP's BPE vocabulary, written out from the copy inside open_clip (the same merges; no download)."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, vocab_file, merges_file = write_clip_vocabulary(folder)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )
    # FrozenCLIPEmbedder's constructor downloads openai/clip-vit-large-patch14; build it around ours instead.
    encoder = FrozenCLIPEmbedder.__new__(FrozenCLIPEmbedder)
    torch.nn.Module.__init__(encoder)
    encoder.tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file))
    encoder.transformer = CLIPTextModel(config)
    encoder.device, encoder.max_length, encoder.layer, encoder.layer_idx = "cpu", 77, "last", None
    make_random_init_informative(encoder, torch.Generator().manual_seed(seed))
    encoder.freeze()
    return encoder
