"""The built-in tiny SD 2.x-architecture model: random weights from a fixed seed, built from config.

It has the real structure (diffusers UNet with linear projections and upcast attention, an 8x VAE, a CLIP
text encoder read at its penultimate layer, v-parameterization) at a size that trains in seconds on a CPU.
Its weights are random, so its images are noise: it exists for the demo and the tests.
"""

from __future__ import annotations

import torch

from ti_trainer.backends.clip_bpe import tiny_tokenizer
from ti_trainer.backends.diffusers_backend import DiffusersBackend
from ti_trainer.diffusion import scaled_linear_schedule
from ti_trainer.text.conditioning import TextRules, TokenIds

TINY_WIDTH = 32
TINY_SEED = 1234


def build_tiny_components(
    parameterization: str = "v", seed: int = TINY_SEED, text_width: int = TINY_WIDTH, family: str = "sd2"
):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=family == "sd2",
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=text_width,
            intermediate_size=text_width * 2,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            # SD 2.x's OpenCLIP uses GELU; SD 1.x's OpenAI CLIP uses quick-GELU.
            hidden_act="gelu" if family == "sd2" else "quick_gelu",
            bos_token_id=tokenizer.start_id,
            eos_token_id=tokenizer.end_id,
            pad_token_id=0,
        )
    )
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, vae, text_encoder):
        make_random_init_informative(module, generator)
    return unet, vae, text_encoder, tokenizer


def tiny_vae(**config):
    """The tiny models' VAE: SD's architecture (8x down, 4 latent channels) at toy widths; `config` adds to
    diffusers' defaults (SDXL's scaling factor)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        **config,
    )


def make_random_init_informative(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give a random-init model the two properties of a trained one that training relies on.

    Zero-initialised output layers (UNet conv_out, attention output projections) would make the text
    irrelevant and the embedding's gradient exactly zero; norm layers with zero bias make the text
    conditioning's mean ~0, which A1111's emphasis renormalisation divides by.
    """
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and child.weight is not None:
                child.weight.copy_(1.0 + 0.1 * torch.randn(child.weight.shape, generator=generator))
                child.bias.copy_(0.5 + 0.1 * torch.randn(child.bias.shape, generator=generator))
        for parameter in module.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def tiny_backend(
    parameterization: str = "v",
    device: str | torch.device = "cpu",
    rules: TextRules | None = None,
    family: str = "sd2",
) -> DiffusersBackend:
    """The tiny model as a backend. family "sd2": penultimate layer, pad id 0 after the end token;
    "sd1": last layer, padded with the end token (use parameterization "eps" for SD 1.x)."""
    unet, vae, text_encoder, tokenizer = build_tiny_components(parameterization, family=family)
    sd2 = family == "sd2"
    return DiffusersBackend(
        unet,
        vae,
        text_encoder,
        tokenize=tokenizer,
        token_ids=TokenIds(
            start=tokenizer.start_id,
            end=tokenizer.end_id,
            pad=0 if sd2 else tokenizer.end_id,
            comma=tokenizer.comma_id,
        ),
        schedule=scaled_linear_schedule(parameterization),
        penultimate=sd2,
        model_name=f"tiny-{family}-{parameterization}",
        model_hash=None,
        device=device,
        rules=rules,
        family=family,
    )
