"""The standalone backend: diffusers' UNet and VAE with a transformers CLIP text encoder.

Its text path follows the WebUI's rules (conditioning.py), so an embedding trained here behaves the same in
A1111: SD 2.x uses the penultimate layer + final norm and pads with id 0 after the end token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ti_trainer.backends.contract import LatentDistribution, PreviewRequest, sd_family
from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.memory.plan import MemoryPlan, on_device
from ti_trainer.text.conditioning import (
    InjectingTokenEmbedding,
    PromptChunker,
    PromptEncoder,
    TextRules,
    TokenIds,
    injector_installed,
)


class DiffusersBackend:
    """The contract (backends/contract.py `Backend`) over diffusers' UNet and VAE and a transformers CLIP
    text encoder. It owns these: they are frozen once, here, so `training_session` has nothing to do."""

    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenize: Callable[[list[str]], list[list[int]]],
        token_ids: TokenIds,
        schedule: NoiseSchedule,
        penultimate: bool,
        model_name: str,
        model_hash: str | None = None,
        device: torch.device | str = "cpu",
        rules: TextRules | None = None,
        family: str = "sd2",
    ):
        """`family`: "sd1" or "sd2", the text rules the encoder follows (`token_ids.pad`, `penultimate`)."""
        self.device = torch.device(device)
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)  # only the embedding learns (DESIGN invariant 2)
            module.eval()
            module.to(self.device)
        self.schedule = schedule
        self.penultimate = penultimate
        self.model_name = model_name
        self.model_hash = model_hash
        self.tokenize = tokenize
        self.latent_scale = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.family = sd_family(
            family,
            text_width=text_encoder.config.hidden_size,
            latent_channels=unet.config.in_channels,
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        )
        self.text_width = self.family.text_width
        # The weights a standalone loader gives are fp32: the memory plan chooses the precision.
        self.preferred_precision: str | None = None
        # transformers 4.x nests the layers under `.text_model`; 5.x puts them on the model itself.
        self._text_model = getattr(text_encoder, "text_model", text_encoder)
        self._injector = InjectingTokenEmbedding(self._text_model.embeddings.token_embedding)
        self.prompt_encoder = PromptEncoder(
            PromptChunker(tokenize, token_ids, rules), self._injector, self._encode_chunk, self.device
        )

    # --- the model ----------------------------------------------------------------------------------------------

    def training_session(self) -> contextlib.AbstractContextManager:
        """Nothing to borrow: the model was frozen when this backend was built, and is its own."""
        return contextlib.nullcontext()

    def previewing(self) -> contextlib.AbstractContextManager:
        """Nothing lent out to take back: `render` brings the VAE from RAM itself."""
        return contextlib.nullcontext()

    @property
    def upcasts_attention(self) -> bool:
        """The model wants fp32 attention scores (SD 2.1's config says so)."""
        return bool(getattr(self.unet.config, "upcast_attention", False))

    # SD 1.x/2.x's text encoder is small (0.25 / 0.7 GB in fp16): not worth a copy each step (memory/plan.py).
    lends_text_encoders = False

    def describe_memory(self, plan: MemoryPlan) -> str:
        """Every lever of the plan is this backend's: the plan's own words."""
        return plan.describe()

    def memory_levers(self, plan: MemoryPlan) -> contextlib.AbstractContextManager:
        """Apply a memory plan for the duration of a `with` block (backends/diffusers_memory.py)."""
        from ti_trainer.backends.diffusers_memory import diffusers_memory_levers

        return diffusers_memory_levers(self.unet, self.vae, self.text_encoder, plan)

    # --- text -----------------------------------------------------------------------------------------------

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        """The CLIP text model's token-embedding matrix (`text_model.embeddings.token_embedding.weight`)."""
        self.family.encoder(encoder)
        return self._plain_token_embedding().weight

    def token_vectors(self, text: str) -> torch.Tensor:
        ids = self.tokenize([text])[0]
        weight = self._plain_token_embedding().weight
        return weight[torch.tensor(ids, dtype=torch.long, device=weight.device)].detach().float().cpu()

    def _plain_token_embedding(self) -> torch.nn.Embedding:
        return self._text_model.embeddings.token_embedding

    def _encode_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        # The injector sits in front of the token embedding only while the prompt encodes: the text encoder
        # is left a plain transformers model (its state dict, its own forward) the rest of the time.
        with injector_installed(self._injector, self._text_model.embeddings, "token_embedding"):
            if self.penultimate:
                out = self.text_encoder(input_ids=tokens, output_hidden_states=True)
                return self._text_model.final_layer_norm(out.hidden_states[-2])
            return self.text_encoder(input_ids=tokens).last_hidden_state

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        with on_device(self.vae, self.device):  # it may be waiting in RAM while training
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return LatentDistribution(
            (dist.mean * self.latent_scale).float().cpu(), (dist.std * self.latent_scale).float().cpu()
        )

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        dtype = self.unet.dtype
        return self.unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype)).sample

    @torch.no_grad()
    def render(self, request: PreviewRequest) -> Image.Image:
        cond = self.prompt_encoder([request.prompt], request.vectors)
        uncond = self.prompt_encoder([request.negative_prompt], request.vectors)
        latents = sample_latents(self, request, cond, uncond)
        return decode_to_image(self.vae, latents, self.latent_scale, self.device)


def sample_latents(backend, request: PreviewRequest, cond, uncond) -> torch.Tensor:
    """The preview's latents: the request's sampler over `backend.predict` with classifier-free guidance."""
    scheduler = preview_scheduler(backend.schedule, request.sampler)
    scheduler.set_timesteps(request.steps)
    generator = torch.Generator().manual_seed(int(request.seed))
    factor = backend.family.vae_scale_factor
    shape = (1, backend.family.latent_channels, request.height // factor, request.width // factor)
    latents = torch.randn(shape, generator=generator).to(backend.device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        with_text, without_text = guidance_pair(backend, model_input, t, cond, uncond)
        guided = without_text + request.cfg_scale * (with_text - without_text)
        latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
    return latents


def guidance_pair(backend, latents: torch.Tensor, t, cond, uncond) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction with the prompt and with the negative prompt. When their conditionings are equally
    long tensors they go through the UNet as one batch of two: one call per sampler step instead of two (the
    model runs each sample on its own). A prompt longer than its negative (more 75-token chunks) takes two
    calls, as does a conditioning with parts besides the text (SDXL's): padding would change the image."""
    if not (
        isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor) and cond.shape == uncond.shape
    ):
        return backend.predict(latents, t, cond).float(), backend.predict(latents, t, uncond).float()
    both = backend.predict(torch.cat([latents, latents]), t, torch.cat([cond, uncond])).float()
    return both[:1], both[1:]


def decode_to_image(vae: torch.nn.Module, latents: torch.Tensor, latent_scale: float, device) -> Image.Image:
    with on_device(vae, device):  # it may be waiting in RAM while training
        pixels = vae.decode((latents / latent_scale).to(vae.dtype)).sample
    array = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def preview_scheduler(schedule: NoiseSchedule, sampler: str):
    """A diffusers scheduler for the WebUI sampler name, over the model's own noise schedule."""
    import diffusers

    classes = {
        "Euler a": diffusers.EulerAncestralDiscreteScheduler,
        "Euler": diffusers.EulerDiscreteScheduler,
        "DDIM": diffusers.DDIMScheduler,
        "DPM++ 2M": diffusers.DPMSolverMultistepScheduler,
    }
    cls = classes.get(sampler, diffusers.EulerAncestralDiscreteScheduler)
    alphas = schedule.alphas_cumprod.double()
    betas = 1 - alphas / torch.cat([torch.ones(1, dtype=alphas.dtype), alphas[:-1]])
    prediction = "v_prediction" if schedule.parameterization == "v" else "epsilon"
    return cls(
        num_train_timesteps=len(betas),
        trained_betas=betas.numpy(),
        prediction_type=prediction,
        timestep_spacing="leading",
        steps_offset=1,
    )
