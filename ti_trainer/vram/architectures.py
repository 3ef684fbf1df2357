"""The named architectures the estimate knows, from their published configs, built on the meta device.

Values are those of the models' `unet/config.json`, `text_encoder*/config.json` and `vae/config.json` on the
Hugging Face hub (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base, stabilityai/
stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), written out so that nothing is downloaded.
A model built on the meta device has shapes and dtypes but no memory: building SDXL takes a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ti_trainer.errors import UserError

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend

_SD_UNET_BLOCKS = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    norm_num_groups=32,
)
SD15_UNET = dict(_SD_UNET_BLOCKS, sample_size=64, attention_head_dim=8, cross_attention_dim=768)
SD21_UNET = dict(
    _SD_UNET_BLOCKS,
    sample_size=96,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)
SD21_BASE_UNET = dict(SD21_UNET, sample_size=64, upcast_attention=False)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
# OpenAI CLIP ViT-L/14's text tower (SD 1.x; SDXL's first encoder).
CLIP_L = dict(
    _CLIP_COMMON,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
# OpenCLIP ViT-H's text tower as diffusers stores it for SD 2.x: 23 layers (the penultimate of 24).
OPENCLIP_H = dict(
    _CLIP_COMMON,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
    pad_token_id=0,
)
# OpenCLIP ViT-bigG's text tower (SDXL's second encoder, with its projection for the pooled embedding).
OPENCLIP_BIGG = dict(
    _CLIP_COMMON,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    projection_dim=1280,
    pad_token_id=0,
)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)


@dataclass(frozen=True)
class Architecture:
    name: str
    title: str
    unet: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]
    vae: dict[str, Any] = field(default_factory=lambda: dict(SD_VAE))
    native_px: int = 512
    # "last": the encoder's last hidden state (with its final norm; SD 2.x as diffusers stores it, 23 layers);
    # "penultimate": hidden_states[-2] without the final norm (SDXL), "penultimate+norm": the tiny SD2 model.
    text_layer: str = "last"
    parameterization: str = "eps"

    @property
    def pooled_text(self) -> bool:
        """SDXL: the UNet also takes the second encoder's pooled, projected embedding and the size ids."""
        return self.unet.get("addition_embed_type") == "text_time"


ARCHITECTURES = {
    "sd15": Architecture("sd15", "SD 1.5", SD15_UNET, (CLIP_L,)),
    "sd21-base": Architecture("sd21-base", "SD 2.1-base", SD21_BASE_UNET, (OPENCLIP_H,)),
    "sd21-768": Architecture(
        "sd21-768", "SD 2.1-768-v", SD21_UNET, (OPENCLIP_H,), native_px=768, parameterization="v"
    ),
    "sdxl": Architecture(
        "sdxl", "SDXL", SDXL_UNET, (CLIP_L, OPENCLIP_BIGG), native_px=1024, text_layer="penultimate"
    ),
}
ALIASES = {"sd1.5": "sd15", "sd21": "sd21-768", "sd21-768-v": "sd21-768", "sd2.1": "sd21-768", "xl": "sdxl"}


def named_architecture(name: str) -> Architecture:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ARCHITECTURES:
        raise UserError(
            f"Unknown architecture {name!r}. Known: {', '.join(ARCHITECTURES)}; or give a model path or 'tiny'."
        )
    return ARCHITECTURES[key]


def architecture_of_backend(backend: Backend) -> Architecture:
    """The architecture of a loaded backend: its own configs for a diffusers model (the tiny one included);
    for the WebUI's ldm model, the named architecture it matches (by text width and parameterization); for
    its SDXL, SDXL's."""
    from ti_trainer.backends.diffusers_backend import DiffusersBackend
    from ti_trainer.backends.diffusers_xl_backend import DiffusersXLBackend

    if isinstance(backend, DiffusersXLBackend):
        return Architecture(
            name=backend.model_name,
            title=backend.model_name,
            unet=dict(backend.unet.config),
            text_encoders=(backend.text_encoder.config.to_dict(), backend.text_encoder_2.config.to_dict()),
            vae=dict(backend.vae.config),
            native_px=int(backend.unet.config.sample_size) * backend.family.vae_scale_factor,
            text_layer="penultimate",
            parameterization=backend.schedule.parameterization,
        )
    if isinstance(backend, DiffusersBackend):
        return Architecture(
            name=backend.model_name,
            title=backend.model_name,
            unet=dict(backend.unet.config),
            text_encoders=(backend.text_encoder.config.to_dict(),),
            vae=dict(backend.vae.config),
            native_px=int(backend.unet.config.sample_size) * backend.family.vae_scale_factor,
            text_layer="penultimate+norm" if backend.penultimate else "last",
            parameterization=backend.schedule.parameterization,
        )
    v = backend.schedule.parameterization == "v"
    guessed = {768: "sd15", 1024: "sd21-768" if v else "sd21-base"}.get(backend.text_width, "sd15")
    if backend.family.name == "sdxl":  # the WebUI's sgm SDXL (backends/sgm_backend.py)
        guessed = "sdxl"
    return replace(ARCHITECTURES[guessed], title=f"{ARCHITECTURES[guessed].title} (as the loaded model)")


@dataclass
class MetaModel:
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    vae: torch.nn.Module
    architecture: Architecture


def build_on_meta(architecture: Architecture, device: str = "meta") -> MetaModel:
    """The architecture's UNet, text encoder(s) and VAE on the meta device (or, for the tests' cross-check,
    with random weights on a real one), every weight frozen, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(architecture.unet)
        vae = AutoencoderKL.from_config(architecture.vae)
        encoders = []
        for index, config in enumerate(architecture.text_encoders):
            with_projection = architecture.pooled_text and index == len(architecture.text_encoders) - 1
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            encoders.append(cls(CLIPTextConfig.from_dict(config)))
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()
    return MetaModel(unet, encoders, vae, architecture)
