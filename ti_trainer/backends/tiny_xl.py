"""The built-in tiny SDXL-architecture model: random weights from a fixed seed, built from config.

The real structure at toy size: a diffusers UNet with SDXL's "text_time" vector input (pooled text plus the
size and crop numbers, each embedded sinusoidally) and no attention at full latent resolution, SDXL's two text
encoders (a CLIP ViT-L-like `CLIPTextModel` with quick-GELU, an OpenCLIP bigG-like
`CLIPTextModelWithProjection` with GELU and a projection as wide as the tower), an 8x VAE with SDXL's scale
factor, eps-prediction on the scaled-linear schedule. Widths as the WebUI stand-in's tiny SDXL: CLIP-L 32 and
bigG 48 (cross-attention 80), size numbers embedded 8 wide (vector input 48 + 6 x 8 = 96).
Its weights are random, so its images are noise: it exists for the demo and the tests.
"""

from __future__ import annotations

import torch

from ti_trainer.backends.clip_bpe import tiny_tokenizer
from ti_trainer.backends.diffusers_xl_backend import SDXL_LATENT_SCALE, DiffusersXLBackend
from ti_trainer.backends.tiny import TINY_SEED, make_random_init_informative, tiny_vae
from ti_trainer.diffusion import scaled_linear_schedule
from ti_trainer.text.conditioning import TextRules, TokenIds

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 48
SIZE_EMBEDDING_WIDTH = 8  # SDXL: 256 per number


def build_tiny_xl_components(seed: int = TINY_SEED):
    """UNet, VAE, CLIP-L-like and bigG-like text encoders, and the tokenizer they share."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # SDXL has no attention at full latent resolution (`attention_resolutions: [4, 2]`).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SIZE_EMBEDDING_WIDTH,
        projection_class_embeddings_input_dim=CLIP_G_WIDTH + 6 * SIZE_EMBEDDING_WIDTH,
        norm_num_groups=8,
    )
    vae = tiny_vae(scaling_factor=SDXL_LATENT_SCALE)

    def text_config(width: int, activation: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=width,
            intermediate_size=width * 2,
            projection_dim=width,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=activation,
            bos_token_id=tokenizer.start_id,
            eos_token_id=tokenizer.end_id,
            pad_token_id=0,
        )

    text_encoder = CLIPTextModel(text_config(CLIP_L_WIDTH, "quick_gelu"))  # OpenAI CLIP's activation
    text_encoder_2 = CLIPTextModelWithProjection(text_config(CLIP_G_WIDTH, "gelu"))  # OpenCLIP's
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, vae, text_encoder, text_encoder_2):
        make_random_init_informative(module, generator)
    return unet, vae, text_encoder, text_encoder_2, tokenizer


def tiny_xl_backend(device: str | torch.device = "cpu", rules: TextRules | None = None) -> DiffusersXLBackend:
    """The tiny SDXL model as a backend: CLIP-L pads with the end token, bigG with 0 after it."""
    unet, vae, text_encoder, text_encoder_2, tokenizer = build_tiny_xl_components()
    return DiffusersXLBackend(
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        tokenize=tokenizer,
        token_ids=TokenIds(
            start=tokenizer.start_id, end=tokenizer.end_id, pad=tokenizer.end_id, comma=tokenizer.comma_id
        ),
        schedule=scaled_linear_schedule("eps"),
        model_name="tiny-sdxl",
        model_hash=None,
        device=device,
        rules=rules,
        pad_2=0,
    )
