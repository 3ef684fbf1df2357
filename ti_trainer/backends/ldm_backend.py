"""The WebUI's backend: training on the ldm `LatentDiffusion` the WebUI has loaded, in place, with no copy.

SD 2.x (768-v and 512-base: OpenCLIP text encoder) and SD 1.x (CLIP). Text conditioning is what the WebUI
computes at generation time (reference/a1111.md §3): conditioning.py's chunker over the WebUI's own tokenizer
(the hijacked text encoder's `tokenize` and token ids), the text encoder's own forward (OpenCLIP:
`encode_with_transformer`, the configured layer, penultimate + ln_final for SD 2.x; CLIP: the hidden state at
"Clip skip" + final norm), and emphasis and comma back-tracking from the WebUI's options. The trainable vectors
go in through a wrapper around the token-embedding layer, installed only for the duration of each encode.

The model is borrowed, not owned: `training_session()` freezes every weight for a run and gives the model back
exactly as it was found, whether the run ends in success, an error or an Interrupt. The training loop enters
it (loop.train); outside a session the backend changes nothing on the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from ti_trainer.backends.borrowed_model import SessionDepth, frozen_as_found
from ti_trainer.backends.contract import LatentDistribution, PreviewRequest, sd_family
from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import MemoryPlan, on_device
from ti_trainer.text.conditioning import (
    InjectingTokenEmbedding,
    PromptChunker,
    PromptEncoder,
    TextRules,
    TokenIds,
    injector_installed,
)


class LdmBackend:
    """The contract (backends/contract.py `Backend`) over the WebUI's loaded `LatentDiffusion`."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str,
        rules: TextRules | None = None,
        clip_skip: int = 1,
        model_name: str = "",
        model_hash: str | None = None,
        low_vram: bool = False,
        context_hook: Callable | None = None,
    ):
        """`model` is the WebUI's loaded model after its hijack (its `cond_stage_model` is the WebUI's
        wrapper); `device` is where the WebUI computes (`devices.device`); `clip_skip` is its
        CLIP_stop_at_last_layers (SD 1.x only: SD 2.x uses the layer its config names); `low_vram`: the WebUI
        runs with --medvram/--lowvram, so placement is taken over while training (backends/ldm_memory.py);
        `context_hook`: the WebUI's hypernetworks, applied to the cross-attention context as its own
        attention does."""
        _check_supported(model)
        self.model = model
        self.device = torch.device(device)
        self.model_name = model_name
        self.model_hash = model_hash
        self.clip_skip = max(1, int(clip_skip))
        # The WebUI sets alphas_cumprod_original at load; alphas_cumprod itself may be rescaled for sampling
        # ("Zero terminal SNR", "downcast alphas"), which is not the schedule the model was trained with.
        alphas = getattr(model, "alphas_cumprod_original", None)
        alphas = model.alphas_cumprod if alphas is None else alphas
        self.schedule = NoiseSchedule(alphas.detach().double().cpu(), model.parameterization)

        wrapper = model.cond_stage_model
        self._text = wrapper.wrapped
        self._open_clip = hasattr(self._text, "encode_with_transformer")
        if self._open_clip:
            self._embedding_owner, self._embedding_attribute = self._text.model, "token_embedding"
        else:
            self._embedding_owner = self._text.transformer.text_model.embeddings
            self._embedding_attribute = "token_embedding"
        self._tokenize: Callable[[list[str]], list[list[int]]] = wrapper.tokenize
        ids = TokenIds(
            start=wrapper.id_start, end=wrapper.id_end, pad=wrapper.id_pad, comma=wrapper.comma_token
        )
        self._injector = InjectingTokenEmbedding(self._token_embedding_layer())
        self.prompt_encoder = PromptEncoder(
            PromptChunker(self._tokenize, ids, rules), self._injector, self._encode_chunk, self.device
        )
        first_stage = model.first_stage_model
        self.family = sd_family(
            "sd2" if self._open_clip else "sd1",
            text_width=self._token_embedding_layer().weight.shape[1],
            latent_channels=first_stage.embed_dim,
            vae_scale_factor=2 ** (first_stage.encoder.num_resolutions - 1),
        )
        self.text_width = self.family.text_width
        self._sessions = SessionDepth()
        self.low_vram = low_vram
        self.context_hook = context_hook
        self._placement = None

    # --- the borrowed model -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training_session(self) -> Iterator[LdmBackend]:
        """Freeze every weight for a run, then put back requires_grad, gradients and train/eval flags.

        Re-entrant: only the outermost session records and restores. Frozen weights mean no weight gradients
        are computed or stored (the WebUI leaves its UNet trainable); only the embedding's vectors learn.
        """
        owner = [(self._embedding_owner, self._embedding_attribute)]
        with self._sessions.enter(lambda: frozen_as_found(self.model, owner)):
            yield self

    # --- memory (memory/plan.py chooses the plan) ------------------------------------------------------------

    @property
    def upcasts_attention(self) -> bool:
        """SD 2.x computes attention scores in fp32 (ldm's ATTN_PRECISION); in fp16, 2.1-768 NaNs without it."""
        return self._open_clip

    @property
    def preferred_precision(self) -> str | None:
        """Train in the half precision the WebUI holds its weights in, so no converted copy of them is made."""
        dtype = next(self.model.model.diffusion_model.parameters()).dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)

    # SD 1.x/2.x's text encoder is small (0.25 / 0.7 GB in fp16): not worth a copy each step (memory/plan.py).
    lends_text_encoders = False

    def describe_memory(self, plan: MemoryPlan) -> str:
        """Every lever of the plan is this backend's: the plan's own words."""
        return plan.describe()

    @contextlib.contextmanager
    def memory_levers(self, plan: MemoryPlan) -> Iterator[None]:
        """The plan's attention, checkpointing, weights and VAE placement on the WebUI's model for a run;
        under --medvram/--lowvram the WebUI's placement hooks are taken out too. All undone afterwards."""
        from ti_trainer.backends.ldm_memory import TrainingPlacement, ldm_memory_levers

        with contextlib.ExitStack() as levers:
            if self.low_vram:
                self._placement = levers.enter_context(TrainingPlacement(self.model, self.device))
                levers.callback(setattr, self, "_placement", None)
                plan = dataclasses.replace(plan, vae_offload=False)  # the placement keeps the VAE in RAM
            levers.enter_context(ldm_memory_levers(self.model, plan, self.context_hook))
            yield

    def previewing(self) -> contextlib.AbstractContextManager:
        """For one preview through the WebUI's txt2img: its own placement back (under --medvram/--lowvram),
        or else the VAE back on the GPU to decode."""
        if self._placement is not None:
            return self._placement.lent_to_host()
        return on_device(self.model.first_stage_model, self.device)

    # --- what the training loop uses ------------------------------------------------------------------------

    def token_vectors(self, text: str) -> torch.Tensor:
        ids = self._tokenize([text])[0]
        weight = self._token_embedding_layer().weight
        return weight[torch.tensor(ids, dtype=torch.long, device=weight.device)].detach().float().cpu()

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        """The text encoder's token-embedding matrix: OpenCLIP's `model.token_embedding.weight` (SD 2.x's
        FrozenOpenCLIPEmbedder) or CLIP's `transformer.text_model.embeddings.token_embedding.weight` (SD 1.x's
        FrozenCLIPEmbedder), under the WebUI's wrapper."""
        self.family.encoder(encoder)
        return self._token_embedding_layer().weight

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        vae_dtype = next(self.model.first_stage_model.parameters()).dtype
        # The device the WebUI computes on, not the VAE's current one: under --medvram the WebUI moves the
        # VAE there itself when encode is called.
        with self._half_precision_guard(vae_dtype):
            dist = self.model.encode_first_stage(pixels.to(self.device, vae_dtype))
        scale = float(self.model.scale_factor)
        return LatentDistribution((dist.mean * scale).float().cpu(), (dist.std * scale).float().cpu())

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        dtype = next(self.model.model.diffusion_model.parameters()).dtype
        with self._half_precision_guard(dtype):
            return self.model.apply_model(
                noisy_latents.to(self.device, dtype), timesteps.to(self.device), cond.to(self.device, dtype)
            )

    def render(self, request: PreviewRequest) -> None:
        """None: in the WebUI, previews go through its own txt2img (host/a1111.py `render_preview`)."""
        return None

    # --- text ------------------------------------------------------------------------------------------------

    def _token_embedding_layer(self) -> torch.nn.Embedding:
        """The plain embedding table under the WebUI's wrapper (EmbeddingsWithFixes) and ours."""
        layer = getattr(self._embedding_owner, self._embedding_attribute)
        while not isinstance(layer, torch.nn.Embedding):
            layer = layer.wrapped
        return layer

    def _encode_chunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the text encoder over `[B, 77]` token ids with our injector in front of its token embedding.

        The injector wraps whatever is there (the WebUI's EmbeddingsWithFixes, which with no fixes of the
        WebUI's own set is the plain lookup) and is removed again before this returns.
        """
        injected = injector_installed(self._injector, self._embedding_owner, self._embedding_attribute)
        with injected, self._half_precision_guard(self._token_embedding_layer().weight.dtype):
            if self._open_clip:
                return self._text.encode_with_transformer(tokens)
            outputs = self._text.transformer(input_ids=tokens, output_hidden_states=self.clip_skip > 1)
            if self.clip_skip > 1:
                hidden = outputs.hidden_states[-self.clip_skip]
                return self._text.transformer.text_model.final_layer_norm(hidden)
            return outputs.last_hidden_state

    def _half_precision_guard(self, weights_dtype: torch.dtype):
        """The WebUI keeps its model in fp16 and computes under autocast; do the same when the caller has
        no autocast of its own (an fp16 UNet cannot take fp32 timestep embeddings otherwise)."""
        half = weights_dtype in (torch.float16, torch.bfloat16)
        if self.device.type == "cuda" and half and not torch.is_autocast_enabled():
            return torch.autocast("cuda", dtype=weights_dtype)
        return contextlib.nullcontext()


def _check_supported(model) -> None:
    if hasattr(model, "conditioner"):
        raise UserError(
            "The loaded model is SDXL. This trainer trains embeddings for SD 1.x and SD 2.x: load one of those "
            "in the checkpoint dropdown at the top of the WebUI."
        )
    wrapper = getattr(model, "cond_stage_model", None)
    if wrapper is None or not hasattr(wrapper, "wrapped") or not hasattr(wrapper, "tokenize"):
        raise UserError(
            "The loaded model's text encoder is not the WebUI's usual one (was it replaced by another "
            "extension?). Reload the checkpoint and try again."
        )
    key = getattr(getattr(model, "model", None), "conditioning_key", None)
    if key != "crossattn":
        raise UserError(
            f"The loaded model takes {key!r} conditioning (an inpainting, depth or upscale model). Train on the "
            "base model it was made from: embeddings trained there work with it too."
        )
    if getattr(model, "parameterization", None) not in ("eps", "v"):
        raise UserError(
            f"The loaded model predicts {getattr(model, 'parameterization', None)!r}; this trainer handles "
            "noise (eps) and v-prediction models."
        )
