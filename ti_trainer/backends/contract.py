"""What a backend gives the training core: the whole contract, in one place.

A backend wraps one loaded model (the WebUI's ldm `LatentDiffusion`: backends/ldm_backend.py; diffusers'
components: backends/diffusers_backend.py). The core reads nothing else of it: every `backend` parameter in
the package is typed `Backend`, and no code asks a backend whether it has a member. A member some backend
has no use for is still there, with the neutral behaviour documented below (a `nullcontext`, None).

What a model family changes (how many text encoders and how wide, the latent channels, the VAE's
downsampling, conditioning beyond the text) is data: `Backend.family`, a `ModelFamily`. A new family (SDXL:
two text encoders of widths 768 and 1280, size and crop conditioning) is one new backend file that fills in
this contract, plus its memory levers (backends/*_memory.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from PIL import Image

from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.embeddings.vectors import Vectors
from ti_trainer.text.conditioning import PromptEncoding

if TYPE_CHECKING:
    from ti_trainer.memory.plan import MemoryPlan


@dataclass
class LatentDistribution:
    """The VAE's latent distribution for a batch, already multiplied by the model's scale factor."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
        )
        return self.mean + self.std * noise


@dataclass
class PreviewRequest:
    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    seed: int
    width: int
    height: int
    sampler: str
    vectors: dict[str, Vectors]  # embedding name -> its vectors (a tensor, or one per text encoder)


# --- model families ------------------------------------------------------------------------------------------

# The name of the vectors an embedding holds for each text encoder, as multi-encoder embedding files key them
# (SDXL files: "clip_l", "clip_g"). A one-encoder family's embedding keeps A1111's single tensor
# (`string_to_param["*"]`, `Embedding.vectors`): its key names the encoder, not a field of the file.
CLIP_L = "clip_l"  # OpenAI CLIP ViT-L/14: SD 1.x (and SDXL's first encoder)
CLIP_H = "clip_h"  # OpenCLIP ViT-H/14: SD 2.x
CLIP_G = "clip_g"  # OpenCLIP ViT-bigG/14: SDXL's second encoder

FAMILY_TITLES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# The text-encoder width of each family's released models: how an embedding file (which records no family)
# is recognised in messages. SDXL's is A1111's "shape" of an SDXL embedding: 768 + 1280.
FAMILY_TEXT_WIDTHS = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
_FAMILY_ENCODERS = {"sd1": CLIP_L, "sd2": CLIP_H}
# SDXL's conditioning besides the text's hidden states, in the order the UNet's vector input takes them.
SDXL_EXTRA_CONDITIONING = ("pooled_text", "original_size", "crop_top_left", "target_size")
# With SDXL's 1024x1024 that gives its usual sizes around one megapixel: 1024x1024 to 1536x640 in steps of
# 64 px (and their transposes), all among the sizes SDXL was trained on.
SDXL_BUCKET_MAX_RATIO = 2.4


@dataclass(frozen=True)
class TextEncoderSpec:
    key: str  # CLIP_L | CLIP_H | CLIP_G: which vectors of an embedding this encoder takes
    width: int  # its token-embedding width: the length of each of those vectors


@dataclass(frozen=True)
class ModelFamily:
    """What a model family changes for training, as data the core reads instead of assuming SD 1.x/2.x."""

    name: str  # "sd1" | "sd2" | "sdxl"
    text_encoders: tuple[TextEncoderSpec, ...]
    latent_channels: int = 4
    vae_scale_factor: int = 8  # image pixels per latent pixel, per side
    # Conditioning the UNet takes besides the text's hidden states (SDXL: "pooled_text", "original_size",
    # "crop_top_left", "target_size"); such a family's prompt encoder returns them with the text, and its
    # `predict` takes them back. SD 1.x and 2.x have none.
    extra_conditioning: tuple[str, ...] = ()
    # The widest aspect ratio of the family's aspect-ratio buckets (training/buckets.py). SDXL was trained on
    # buckets of about one megapixel up to 1536x640 and beyond; 2.4 keeps that one.
    bucket_max_ratio: float = 2.0

    @property
    def title(self) -> str:
        return FAMILY_TITLES.get(self.name, self.name)

    def encoder(self, key: str) -> TextEncoderSpec:
        """The text encoder keyed `key`; a key the family does not have is a programming error."""
        for spec in self.text_encoders:
            if spec.key == key:
                return spec
        keys = [spec.key for spec in self.text_encoders]
        raise ValueError(f"{self.title}'s text encoders are {keys}, not {key!r}")

    @property
    def text_width(self) -> int:
        """The width of an embedding's vectors: this family's one text encoder's; with several encoders, their
        sum (A1111's `shape` of an SDXL embedding: 768 + 1280 = 2048), which `Embedding.width` reports too."""
        return sum(spec.width for spec in self.text_encoders)

    @property
    def vectors_per_encoder(self) -> bool:
        """An embedding for this family holds one set of vectors per text encoder (a dict keyed by encoder,
        SDXL's `clip_l`/`clip_g`), not A1111's single tensor."""
        return len(self.text_encoders) > 1

    def keyed_vectors(self, vectors: Vectors) -> dict[str, torch.Tensor]:
        """`vectors` keyed by encoder, in the family's encoder order: a one-encoder family's single tensor
        under its encoder's key; a dict as it is (its keys are checked where a file is matched to a model:
        embeddings/checks.py `require_fits`)."""
        if isinstance(vectors, torch.Tensor):
            return {self.text_encoders[0].key: vectors}
        return {spec.key: vectors[spec.key] for spec in self.text_encoders}

    def zero_vectors(self, num_vectors: int, device: torch.device | str = "cpu") -> Vectors:
        """`num_vectors` zero vectors in the form this family's embeddings take (a tensor, or one per encoder)."""
        zeros = {
            spec.key: torch.zeros(num_vectors, spec.width, dtype=torch.float32, device=device)
            for spec in self.text_encoders
        }
        return zeros if self.vectors_per_encoder else zeros[self.text_encoders[0].key]


def sd_family(name: str, text_width: int, latent_channels: int = 4, vae_scale_factor: int = 8) -> ModelFamily:
    """SD 1.x ("sd1") or 2.x ("sd2"): one text encoder of `text_width` (768 and 1024 in the released models;
    the tests' tiny models are narrower)."""
    encoder = TextEncoderSpec(_FAMILY_ENCODERS[name], int(text_width))
    return ModelFamily(name, (encoder,), int(latent_channels), int(vae_scale_factor))


def sdxl_family(clip_l_width: int = 768, clip_g_width: int = 1280, vae_scale_factor: int = 8) -> ModelFamily:
    """SDXL: CLIP ViT-L (768) then OpenCLIP ViT-bigG (1280), whose penultimate hidden states are concatenated in
    that order, with bigG's pooled output and the size and crop conditioning in the UNet's vector input (the
    tests' tiny model is narrower)."""
    encoders = (TextEncoderSpec(CLIP_L, int(clip_l_width)), TextEncoderSpec(CLIP_G, int(clip_g_width)))
    return ModelFamily(
        "sdxl", encoders, 4, int(vae_scale_factor), SDXL_EXTRA_CONDITIONING, SDXL_BUCKET_MAX_RATIO
    )


def family_title_for_width(width: int, otherwise: str) -> str:
    """The family whose released models have text-encoder width `width`, for messages ("SD 2.x")."""
    names = [name for name, known in FAMILY_TEXT_WIDTHS.items() if known == width]
    return FAMILY_TITLES[names[0]] if names else otherwise


# --- the backend ---------------------------------------------------------------------------------------------


@runtime_checkable  # so a test can check that a backend has every member
class Backend(Protocol):
    """Every member a backend has. The core uses these and nothing else.

    Attributes:
        device: where the model computes (the WebUI's `devices.device`; the standalone choice).
        schedule: the noise schedule and parameterization the model was trained with (data, not branches).
        family: the model family: text encoders and their widths, latent channels, VAE downsampling, extra
            conditioning.
        text_width: `family.text_width`, the width of an embedding's vectors (kept as the short name the
            one-encoder families use everywhere; with several encoders, the sum of their widths).
        prompt_encoder: prompts -> conditioning with the WebUI's rules and the trainable vectors injected
            (text/conditioning.py); its `chunker` registers the names prompts may contain. It takes each
            name's vectors in the family's form (embeddings/vectors.py) and returns what `predict` takes:
            a tensor, or (a family with extra conditioning) an object only this backend reads.
        model_name, model_hash: recorded in the embedding and the run's settings, as A1111 records them.
        upcasts_attention: the model wants fp32 attention scores (SD 2.x; in fp16, 2.1-768 NaNs without).
        preferred_precision: the half precision its weights already have ("fp16" for the WebUI's model) so a
            run on "auto" precision computes in it instead of converting them; None lets the plan choose.
        lends_text_encoders: the text encoders can wait in RAM for a run and come to the GPU only for their
            own forward and backward (the plan's `text_encoders_lent`; SDXL's backends). False where that is
            not worth it (SD 1.x/2.x's small encoder) or not ours to do (Forge places its models itself).
    """

    device: torch.device
    schedule: NoiseSchedule
    family: ModelFamily
    text_width: int
    prompt_encoder: PromptEncoding
    model_name: str
    model_hash: str | None

    @property
    def upcasts_attention(self) -> bool: ...

    @property
    def preferred_precision(self) -> str | None: ...

    @property
    def lends_text_encoders(self) -> bool: ...

    def token_vectors(self, text: str) -> Vectors:
        """Token embeddings (not contextualised) of `text`'s tokens, no start/end: `[tokens, width]`, fp32 CPU;
        a family with several text encoders gives one such tensor per encoder key, each from that encoder's
        own table (the same tokens: SDXL's two tokenizers share CLIP's BPE)."""
        ...

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        """The token-embedding matrix `[vocab, width]` of the text encoder keyed `encoder` (a key of
        `family.text_encoders`), as stored: no copy, in the model's dtype and on its device. The overbake
        signal's "ordinary words" range is read from it (analysis/norms.py), the same way on every host."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        """`pixels` `[B, 3, H, W]` in [-1, 1] -> scaled latent distribution (fp32, CPU), no gradients."""
        ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's prediction (noise or v, per the schedule's parameterization); `cond` is what
        `prompt_encoder` returned (with the family's extra conditioning inside it)."""
        ...

    def render(self, request: PreviewRequest) -> Image.Image | None:
        """A preview from the backend's own sampler; None where previews are the host's (the WebUI renders
        them through its txt2img: host/a1111.py)."""
        ...

    def memory_levers(self, plan: MemoryPlan) -> contextlib.AbstractContextManager:
        """Apply a memory plan (attention, checkpointing, weights' dtype, VAE placement, lent text encoders) to
        the model for the duration of a `with` block, and undo it afterwards (backends/*_memory.py)."""
        ...

    def describe_memory(self, plan: MemoryPlan) -> str:
        """The plan in words as this backend applies it, for the run's "Memory:" line and its out-of-memory
        advice: `plan.describe()` where every lever of the plan is the backend's to pull. A backend whose host
        keeps some levers its own (Forge: attention, weight storage, placement) says which are the trainer's
        and which the host's, from the host's state as far as it is cheap to read."""
        ...

    def previewing(self) -> contextlib.AbstractContextManager:
        """For one preview during a run: take back what was lent out while training (the WebUI's placement,
        the VAE waiting in RAM). A backend that lends nothing out returns a `nullcontext`."""
        ...

    def training_session(self) -> contextlib.AbstractContextManager:
        """Around a run (or anything that runs a backward pass): freeze every weight, and give a borrowed
        model back exactly as it was found, however the block ends. Re-entrant. A backend that owns its
        model (frozen when it was built) returns a `nullcontext`."""
        ...
