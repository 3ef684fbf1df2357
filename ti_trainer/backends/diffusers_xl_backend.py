"""The standalone SDXL backend: diffusers' SDXL UNet and VAE with transformers' two CLIP text encoders.

Its text path is the WebUI's (reference/sdxl.md §2; text/multi_encoder.py): CLIP ViT-L's penultimate hidden
states (`hidden_states[-2]`, A1111's `layer_idx: 11`, no final norm) and OpenCLIP ViT-bigG's penultimate ones
(no final norm), concatenated to 768 + 1280 = 2048, with bigG's pooled, projected output of the first chunk.
The UNet's vector input gets that pooled text and the size and crop conditioning, which `predict` adds from
the latents' size the way the WebUI conditions a generation (docs/sdxl.md): original size = target size = the
image's (height, width) in pixels, crop (0, 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from PIL import Image

from ti_trainer.backends.contract import LatentDistribution, PreviewRequest, sdxl_family
from ti_trainer.backends.diffusers_backend import decode_to_image, sample_latents
from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.memory.plan import MemoryPlan, on_device, text_encoder_lent, weights_in
from ti_trainer.text.conditioning import (
    InjectingTokenEmbedding,
    PromptChunker,
    TextRules,
    TokenIds,
    injector_installed,
)
from ti_trainer.text.multi_encoder import EncoderPath, MultiEncoderPromptEncoder, TextConditioning

# The VAE scale factor of SDXL's VAE (sd_xl_base.yaml `scale_factor`; SD 1.x/2.x use 0.18215).
SDXL_LATENT_SCALE = 0.13025
# The WebUI's crop conditioning for a generation: its "sdxl_crop_top"/"sdxl_crop_left" settings, default 0.
CROP_TOP_LEFT = (0, 0)


def size_conditioning(height_px: int, width_px: int) -> tuple[int, ...]:
    """The six numbers of SDXL's size and crop conditioning, in the UNet's order and (h, w) pairs: original
    size, crop top-left, target size. As the WebUI generates an image of this size (sd_models_xl.py
    `get_learned_conditioning`): original = target = (height, width), crop = the settings' (0, 0)."""
    return (height_px, width_px, *CROP_TOP_LEFT, height_px, width_px)


class DiffusersXLBackend:
    """The contract (backends/contract.py `Backend`) over diffusers' SDXL UNet and VAE and transformers'
    `CLIPTextModel` (CLIP ViT-L) and `CLIPTextModelWithProjection` (OpenCLIP ViT-bigG). It owns them: they
    are frozen once, here."""

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenize: Callable[[list[str]], list[list[int]]],
        token_ids: TokenIds,
        schedule: NoiseSchedule,
        model_name: str,
        model_hash: str | None = None,
        device: torch.device | str = "cpu",
        rules: TextRules | None = None,
        pad_2: int = 0,
    ):
        """`token_ids`: CLIP ViT-L's (padding with the end token); `pad_2`: what bigG pads with after the end
        token (0, as open_clip's tokenizer and A1111's wrapper do)."""
        self.device = torch.device(device)
        self.unet, self.vae = unet, vae
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        for module in (unet, vae, text_encoder, text_encoder_2):
            module.requires_grad_(False)  # only the embedding learns (DESIGN invariant 2)
            module.eval()
            module.to(self.device)
        self.schedule = schedule
        self.model_name = model_name
        self.model_hash = model_hash
        self.tokenize = tokenize
        self.latent_scale = float(getattr(vae.config, "scaling_factor", SDXL_LATENT_SCALE))
        self.family = sdxl_family(
            text_encoder.config.hidden_size,
            text_encoder_2.config.hidden_size,
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
        self.text_width = self.family.text_width
        self.preferred_precision: str | None = None  # fp32 weights: the memory plan chooses
        self._lending = False  # the text encoders wait in RAM for the run and are lent for each forward
        self._text_models = {
            key: getattr(encoder, "text_model", encoder)  # transformers 4.x nests the layers; 5.x does not
            for key, encoder in zip(("clip_l", "clip_g"), (text_encoder, text_encoder_2))
        }
        self._injectors = {
            key: InjectingTokenEmbedding(model.embeddings.token_embedding)
            for key, model in self._text_models.items()
        }
        paths = [
            EncoderPath("clip_l", self._injectors["clip_l"], self._clip_l_chunk, token_ids.end),
            EncoderPath("clip_g", self._injectors["clip_g"], self._clip_g_chunk, pad_2),
        ]
        self.prompt_encoder = MultiEncoderPromptEncoder(
            PromptChunker(tokenize, token_ids, rules), paths, self.device
        )

    # --- the model ----------------------------------------------------------------------------------------------

    def training_session(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the model was frozen when this backend was built, and is its own

    def previewing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # `render` brings the VAE from RAM itself

    @property
    def upcasts_attention(self) -> bool:
        return bool(getattr(self.unet.config, "upcast_attention", False))

    lends_text_encoders = True  # SDXL's two encoders are ~1.6 GB of fp16 weights: worth lending (plan.py)

    def describe_memory(self, plan: MemoryPlan) -> str:
        """Every lever of the plan is this backend's: the plan's own words."""
        return plan.describe()

    @contextlib.contextmanager
    def memory_levers(self, plan: MemoryPlan) -> Iterator[None]:
        """The diffusers levers (backends/diffusers_memory.py), with both text encoders in the plan's weights
        dtype. The VAE is never lowered: SDXL's overflows in fp16 (`encode_images` keeps it in fp32). With the
        plan's `text_encoders_lent`, both encoders wait in RAM for the run (each put back where it was after)
        and `_run_encoder` lends each to the GPU for its forward."""
        from ti_trainer.backends.diffusers_memory import diffusers_memory_levers

        with contextlib.ExitStack() as levers:
            if plan.text_encoders_lent:
                # First, so that their half-precision copies (below) are made in RAM, never on the GPU.
                for encoder in (self.text_encoder, self.text_encoder_2):
                    levers.enter_context(on_device(encoder, "cpu"))
            text_encoders = torch.nn.ModuleList([self.text_encoder, self.text_encoder_2])
            levers.enter_context(diffusers_memory_levers(self.unet, self.vae, text_encoders, plan))
            self._lending = plan.text_encoders_lent
            levers.callback(setattr, self, "_lending", False)
            yield

    # --- text -----------------------------------------------------------------------------------------------

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        self.family.encoder(encoder)
        return self._text_models[encoder].embeddings.token_embedding.weight

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Each encoder's token embeddings of `text` (the same token ids: the tokenizers share CLIP's BPE)."""
        ids = self.tokenize([text])[0]
        vectors = {}
        for spec in self.family.text_encoders:
            weight = self.token_embedding_weight(spec.key)
            index = torch.tensor(ids, dtype=torch.long, device=weight.device)
            vectors[spec.key] = weight[index].detach().float().cpu()
        return vectors

    def _run_encoder(self, key: str, tokens: torch.Tensor):
        # The injector sits in front of the token embedding only while the prompt encodes; a lent encoder
        # is on the GPU only for this forward (memory_levers).
        encoder = self.text_encoder if key == "clip_l" else self.text_encoder_2
        lent = text_encoder_lent(encoder, self.device) if self._lending else contextlib.nullcontext()
        with (
            injector_installed(self._injectors[key], self._text_models[key].embeddings, "token_embedding"),
            lent,
        ):
            return encoder(input_ids=tokens, output_hidden_states=True)

    def _clip_l_chunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = self._run_encoder("clip_l", tokens)
        return out.hidden_states[-2], None  # A1111's layer_idx 11 of 12: no final norm

    def _clip_g_chunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run_encoder("clip_g", tokens)
        # Penultimate without ln_final; pooled = ln_final of the last layer at the end token, projected.
        return out.hidden_states[-2], out.text_embeds

    # --- images and the UNet ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        # In fp32 whatever the VAE was loaded in: SDXL's VAE overflows in fp16 (NaN latents).
        with on_device(self.vae, self.device), weights_in(torch.float32, self.vae):
            dist = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        return LatentDistribution(
            (dist.mean * self.latent_scale).float().cpu(), (dist.std * self.latent_scale).float().cpu()
        )

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning
    ) -> torch.Tensor:
        dtype = self.unet.dtype
        batch = noisy_latents.shape[0]
        factor = self.family.vae_scale_factor
        sizes = size_conditioning(noisy_latents.shape[-2] * factor, noisy_latents.shape[-1] * factor)
        time_ids = torch.tensor([sizes] * batch, dtype=dtype, device=noisy_latents.device)
        return self.unet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=cond.hidden.to(dtype),
            added_cond_kwargs={"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids},
        ).sample

    @torch.no_grad()
    def render(self, request: PreviewRequest) -> Image.Image:
        cond = self.prompt_encoder([request.prompt], request.vectors)
        uncond = self.negative_conditioning(request)
        latents = sample_latents(self, request, cond, uncond)
        with weights_in(torch.float32, self.vae):  # fp32, as for encoding: the SDXL VAE overflows in fp16
            return decode_to_image(self.vae, latents.float(), self.latent_scale, self.device)

    def negative_conditioning(self, request: PreviewRequest) -> TextConditioning:
        """The WebUI's: an empty negative prompt is zeros (text and pooled; sgm's `force_zero_embeddings`),
        any other is encoded like a prompt."""
        uncond = self.prompt_encoder([request.negative_prompt], request.vectors)
        if request.negative_prompt == "":
            return TextConditioning(torch.zeros_like(uncond.hidden), torch.zeros_like(uncond.pooled))
        return uncond
