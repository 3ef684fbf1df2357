"""A tiny SDXL: sgm's DiffusionEngine built from a shrunk sd_xl_base.yaml with random weights (the stand-in sgm
package in standin/sgm, around the real networks), loaded into the stand-in WebUI the way A1111 v1.10.1 loads
SDXL (sdxl.md §1).

Widths: CLIP-L 32 and bigG 48, so crossattn is [B, 77k, 80]; pooled bigG 48 plus three (h, w) pairs embedded 8
wide each, so vector is [B, 96] (the reference's [run] model). Both text models keep open_clip's full 49408-token
BPE vocabulary, so prompts tokenize as in the WebUI; CLIP-L's transformers tokenizer files are written from
open_clip's copy, and its CLIPTextModel is saved to the same local folder for sgm's `from_pretrained` (no
download anywhere).
"""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from tiny_ldm import write_clip_vocabulary

from ti_trainer.backends.tiny import make_random_init_informative

# A1111's FP8 path on the CPU (devices.autocast: bf16 CPU autocast) runs open_clip's float attention mask
# against bf16 queries; torch casts the two to one dtype only where scaled_dot_product_attention has an
# AutocastCPU kernel (not in torch 2.1, A1111's). A1111 itself fails there at model load, before any of our
# code; on a GPU it autocasts for CUDA, which has the kernel.
FP8_RUNS_ON_CPU = pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("aten::scaled_dot_product_attention", "AutocastCPU"),
    reason="A1111's FP8 on the CPU needs torch's CPU autocast of attention (torch 2.2+); A1111's torch 2.1 lacks it",
)

CLIP_L_WIDTH = 32
CLIP_L_LAYERS = 3
BIGG_WIDTH = 48
SIZE_EMBEDDING_WIDTH = 8  # ConcatTimestepEmbedderND outdim (256 in SDXL)
CROSSATTN_WIDTH = CLIP_L_WIDTH + BIGG_WIDTH
VECTOR_WIDTH = BIGG_WIDTH + 3 * 2 * SIZE_EMBEDDING_WIDTH
BIGG_ARCH = "ti-trainer-tiny-bigG"
SHA256 = "5dc1e0c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123"


def register_tiny_bigg(folder: Path) -> None:
    """An open_clip architecture shaped like ViT-bigG-14's text tower (projection as wide as the tower)."""
    config = {
        "embed_dim": BIGG_WIDTH,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": BIGG_WIDTH, "heads": 4, "layers": 3},
    }
    path = Path(folder) / f"{BIGG_ARCH}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(path)


def write_tiny_clip_l(folder: Path, seed: int = 1234) -> Path:
    """A local transformers folder for sgm's FrozenCLIPEmbedder: tokenizer files and a tiny CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, vocab_file, merges_file = write_clip_vocabulary(folder)
    CLIPTokenizer(str(vocab_file), str(merges_file)).save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_L_WIDTH,
        intermediate_size=CLIP_L_WIDTH * 4,
        num_hidden_layers=CLIP_L_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",  # OpenAI CLIP's
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def tiny_sdxl_config(clip_l_folder: Path):
    """sd_xl_base.yaml's fields, shrunk; use_checkpoint False as A1111's repair_config sets."""

    def text_embedder(target, params):
        return {"is_trainable": False, "input_key": "txt", "target": target, "params": params}

    def size_embedder(key):
        return {
            "is_trainable": False,
            "input_key": key,
            "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": SIZE_EMBEDDING_WIDTH},
        }

    clip_l = {
        "version": str(clip_l_folder),
        "device": "cpu",
        "layer": "hidden",
        "layer_idx": CLIP_L_LAYERS - 1,
    }
    bigg = {
        "arch": BIGG_ARCH,
        "version": None,
        "device": "cpu",
        "freeze": True,
        "layer": "penultimate",
        "always_return_pooled": True,
        "legacy": False,
    }
    unet = {
        "adm_in_channels": VECTOR_WIDTH,
        "num_classes": "sequential",
        "use_checkpoint": False,
        "image_size": 8,  # ldm's UNetModel asks for it; sgm's does not
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,  # GroupNorm has 32 groups
        "attention_resolutions": [2],  # as SDXL, no attention at full latent resolution
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 8,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": CROSSATTN_WIDTH,
        "spatial_transformer_attn_type": "softmax-xformers",
        "legacy": False,
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
            "ch_mult": [1, 1, 1, 1],  # 8x downsampling
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    diffusion = "sgm.modules.diffusionmodules."
    params = {
        "scale_factor": 0.13025,
        "disable_first_stage_autocast": True,
        "denoiser_config": {
            "target": diffusion + "denoiser.DiscreteDenoiser",
            "params": {
                "num_idx": 1000,
                "weighting_config": {"target": diffusion + "denoiser_weighting.EpsWeighting"},
                "scaling_config": {"target": diffusion + "denoiser_scaling.EpsScaling"},
                "discretization_config": {"target": diffusion + "discretizer.LegacyDDPMDiscretization"},
            },
        },
        "network_config": {"target": diffusion + "openaimodel.UNetModel", "params": unet},
        "conditioner_config": {
            "target": "sgm.modules.GeneralConditioner",
            "params": {
                "emb_models": [
                    text_embedder("sgm.modules.encoders.modules.FrozenCLIPEmbedder", clip_l),
                    text_embedder("sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2", bigg),
                    size_embedder("original_size_as_tuple"),
                    size_embedder("crop_coords_top_left"),
                    size_embedder("target_size_as_tuple"),
                ]
            },
        },
        "first_stage_config": {
            "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
            "params": vae,
        },
    }
    return OmegaConf.create({"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}})


def build_tiny_sdxl(clip_l_folder: Path, seed: int = 1234):
    """The engine as A1111 instantiates it, weights random but informative (see make_random_init_informative)."""
    from sgm.util import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_sdxl_config(clip_l_folder).model)
    make_random_init_informative(model, torch.Generator().manual_seed(seed))
    return model.eval()


def prepare(folder: Path) -> Path:
    """Register the bigG architecture and write CLIP-L's folder; returns the folder to build models from."""
    register_tiny_bigg(folder)
    return write_tiny_clip_l(Path(folder) / "clip-l")
