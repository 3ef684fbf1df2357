"""The WebUI's SDXL backend: training on the sgm `DiffusionEngine` the WebUI has loaded, in place, with no copy.

Text conditioning is what the WebUI computes at generation time (reference/sdxl.md §2; text/multi_encoder.py):
our chunker over the WebUI's own tokenizer (the CLIP-L wrapper's `tokenize` and token ids: bigG's tokenizer
shares CLIP's BPE), each text encoder run by itself with our injector in front of its token embedding (which
there is the WebUI's `EmbeddingsWithFixes`). The encoders are called one after the other, not through sgm's
`GeneralConditioner`: the conditioner runs its frozen embedders under `torch.no_grad`, so no gradient would
reach the vectors (sdxl.md §2 "the no-grad trap"). CLIP-L gives its configured hidden layer (`layer_idx`, no
final norm; the "Clip skip SDXL" setting picks one from the end instead), bigG its penultimate layer and the
pooled, projected output of the first chunk.

The UNet's vector input is the pooled text, then the size and crop conditioning built by the conditioner's
own size embedders (`ConcatTimestepEmbedderND`), in the conditioner's order, with the WebUI's generation-time
values at the trained image's size: original = target = (height, width) in pixels, crop = the WebUI's
`sdxl_crop_top`/`sdxl_crop_left` settings (docs/sdxl.md).

FP8 weight storage (the WebUI's "FP8 weight" setting): Linear and Conv2d weights stay in float8 and compute
through the WebUI's own autocast (`compute_context`, the host's `devices.autocast`), as generation does.

The model is borrowed: `training_session()` freezes every weight for a run and gives the model back exactly as
it was found (values, requires_grad, gradients, train/eval flags, the token-embedding wrappers).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from ti_trainer.backends.borrowed_model import SessionDepth, frozen_as_found
from ti_trainer.backends.contract import LatentDistribution, PreviewRequest, sdxl_family
from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import MemoryPlan, on_device, weights_in
from ti_trainer.text.conditioning import (
    InjectingTokenEmbedding,
    PromptChunker,
    TextRules,
    TokenIds,
    injector_installed,
)
from ti_trainer.text.multi_encoder import EncoderPath, MultiEncoderPromptEncoder, TextConditioning

# sgm's input keys of SDXL's size and crop embedders (sd_xl_base.yaml), as the WebUI fills them.
ORIGINAL_SIZE, CROP, TARGET_SIZE = "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def _is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES


class SgmBackend:
    """The contract (backends/contract.py `Backend`) over the WebUI's loaded SDXL (sgm `DiffusionEngine` as
    the WebUI extends it: sd_models_xl.extend_sdxl, its text embedders wrapped by sd_hijack)."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str,
        rules: TextRules | None = None,
        clip_l_layer_from_end: int | None = None,
        crop_top_left: tuple[int, int] = (0, 0),
        model_name: str = "",
        model_hash: str | None = None,
        low_vram: bool = False,
        compute_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        """`clip_l_layer_from_end`: the WebUI's "Clip skip SDXL" (its CLIP_stop_at_last_layers when that is on;
        None takes the layer the model's config names). `crop_top_left`: its sdxl_crop_top/left settings.
        `low_vram`: it runs with --medvram-sdxl/--medvram/--lowvram, so placement is taken over while training
        (backends/sgm_memory.py `SdxlTrainingPlacement`). `compute_context`: the WebUI's autocast, entered around
        every text and UNet forward when its weights are stored in FP8 (None otherwise)."""
        self._clip_l_wrapper, self._bigg_wrapper = _text_wrappers(model)
        self.model = model
        self.device = torch.device(device)
        self.model_name = model_name
        self.model_hash = model_hash
        alphas = getattr(model, "alphas_cumprod_original", None)
        alphas = model.alphas_cumprod if alphas is None else alphas
        self.schedule = NoiseSchedule(alphas.detach().double().cpu(), model.parameterization)
        self.clip_l_layer_from_end = clip_l_layer_from_end
        self.crop_top_left = tuple(int(value) for value in crop_top_left)
        self.low_vram = low_vram
        self.compute_context = compute_context or contextlib.nullcontext

        clip_l, bigg = self._clip_l_wrapper.wrapped, self._bigg_wrapper.wrapped
        self._clip_l, self._bigg = clip_l, bigg
        self._embedding_owners = {
            "clip_l": (clip_l.transformer.text_model.embeddings, "token_embedding"),
            "clip_g": (bigg.model, "token_embedding"),
        }
        self._injectors = {
            key: InjectingTokenEmbedding(self._token_table(key)) for key in self._embedding_owners
        }
        wrapper = self._clip_l_wrapper
        ids = TokenIds(
            start=wrapper.id_start, end=wrapper.id_end, pad=wrapper.id_pad, comma=wrapper.comma_token
        )
        self._tokenize: Callable[[list[str]], list[list[int]]] = wrapper.tokenize
        paths = [
            EncoderPath("clip_l", self._injectors["clip_l"], self._clip_l_chunk, wrapper.id_pad),
            EncoderPath("clip_g", self._injectors["clip_g"], self._bigg_chunk, self._bigg_wrapper.id_pad),
        ]
        self.prompt_encoder = MultiEncoderPromptEncoder(
            PromptChunker(self._tokenize, ids, rules), paths, self.device
        )
        first_stage = model.first_stage_model
        self.family = sdxl_family(
            self._token_table("clip_l").weight.shape[1],
            self._token_table("clip_g").weight.shape[1],
            vae_scale_factor=2 ** (first_stage.encoder.num_resolutions - 1),
        )
        self.text_width = self.family.text_width
        self._sessions = SessionDepth()
        self._placement = None
        self._lending = False  # the text encoders wait in RAM for the run and are lent for each forward

    # --- the borrowed model -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training_session(self) -> Iterator[SgmBackend]:
        """Freeze every weight for a run, then put back requires_grad, gradients, train/eval flags and the
        token-embedding layers (whatever wraps them). Re-entrant: only the outermost session records."""
        owners = list(self._embedding_owners.values())
        with self._sessions.enter(lambda: frozen_as_found(self.model, owners)):
            yield self

    # --- memory (memory/plan.py chooses the plan) ------------------------------------------------------------

    @property
    def upcasts_attention(self) -> bool:
        return False  # SDXL is eps-prediction and trained in fp16; its attention needs no fp32 scores

    @property
    def fp8_weights(self) -> bool:
        """The WebUI stores the UNet's (and text encoders') Linear/Conv2d weights in float8."""
        return any(_is_fp8(parameter) for parameter in self.model.model.parameters())

    @property
    def preferred_precision(self) -> str | None:
        """Train in the half precision the WebUI holds its weights in (under FP8 storage, that of the weights
        FP8 leaves alone: norms and token tables), so no converted copy of them is made."""
        for parameter in self.model.model.diffusion_model.parameters():
            if not _is_fp8(parameter):
                return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(parameter.dtype)
        return None

    lends_text_encoders = True  # SDXL's two encoders are ~1.6 GB of fp16 weights: worth lending (plan.py)

    def describe_memory(self, plan: MemoryPlan) -> str:
        """Every lever of the plan is this backend's: the plan's own words."""
        return plan.describe()

    @contextlib.contextmanager
    def memory_levers(self, plan: MemoryPlan) -> Iterator[None]:
        """The plan on the WebUI's SDXL for a run (backends/sgm_memory.py), with placement taken over under
        --medvram-sdxl (the UNet on the GPU, the text encoders there only for their forward and backward, the
        VAE in RAM); all undone afterwards. Without it, the plan's `text_encoders_lent` does the same for the
        text encoders alone."""
        from ti_trainer.backends.sgm_memory import SdxlTrainingPlacement, sgm_memory_levers

        with contextlib.ExitStack() as levers:
            if self.low_vram:
                self._placement = levers.enter_context(SdxlTrainingPlacement(self.model, self.device))
                levers.callback(setattr, self, "_placement", None)
                # The placement keeps the VAE and the text encoders in RAM already, and `_run` lends them.
                plan = dataclasses.replace(plan, vae_offload=False, text_encoders_lent=False)
            levers.enter_context(sgm_memory_levers(self.model, plan, keep_fp8=self.fp8_weights))
            self._lending = plan.text_encoders_lent
            levers.callback(setattr, self, "_lending", False)
            yield

    @contextlib.contextmanager
    def previewing(self) -> Iterator[None]:
        """For one preview through the WebUI's txt2img: its own placement back (--medvram-sdxl), or else the
        VAE back on the GPU to decode, and lent text encoders too (its conditioning runs them as they are)."""
        if self._placement is not None:
            with self._placement.lent_to_host():
                yield
            return
        text = on_device(self.model.conditioner, self.device) if self._lending else contextlib.nullcontext()
        with on_device(self.model.first_stage_model, self.device), text:
            yield

    # --- text ------------------------------------------------------------------------------------------------

    def _token_table(self, key: str) -> torch.nn.Embedding:
        """The plain embedding table under the WebUI's EmbeddingsWithFixes (and ours, while encoding)."""
        owner, name = self._embedding_owners[key]
        layer = getattr(owner, name)
        while not isinstance(layer, torch.nn.Embedding):
            layer = layer.wrapped
        return layer

    def token_embedding_weight(self, encoder: str) -> torch.Tensor:
        """CLIP-L's `transformer.text_model.embeddings.token_embedding.weight` or bigG's
        `model.token_embedding.weight`, under the WebUI's wrappers."""
        self.family.encoder(encoder)
        return self._token_table(encoder).weight

    def token_vectors(self, text: str) -> dict[str, torch.Tensor]:
        """Each encoder's token embeddings of `text` (the same token ids: the tokenizers share CLIP's BPE)."""
        ids = self._tokenize([text])[0]
        vectors = {}
        for spec in self.family.text_encoders:
            weight = self.token_embedding_weight(spec.key)
            vectors[spec.key] = (
                weight[torch.tensor(ids, dtype=torch.long, device=weight.device)].detach().float().cpu()
            )
        return vectors

    def _run(self, key: str, encode: Callable[[], object]):
        """One text encoder's forward with our injector in front of its token embedding, under the WebUI's
        autocast when it stores FP8 weights, and (placement taken over, or the plan lending them) with the
        encoder lent to the GPU."""
        from ti_trainer.memory.plan import text_encoder_lent

        owner, name = self._embedding_owners[key]
        encoder = self._clip_l if key == "clip_l" else self._bigg
        with contextlib.ExitStack() as stack:
            stack.enter_context(injector_installed(self._injectors[key], owner, name))
            if self._placement is not None or self._lending:
                stack.enter_context(text_encoder_lent(encoder, self.device))
            stack.enter_context(self.compute_context())
            return encode()

    def _clip_l_chunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        clip_l = self._clip_l
        if self.clip_l_layer_from_end is not None:
            outputs = self._run(
                "clip_l", lambda: clip_l.transformer(input_ids=tokens, output_hidden_states=True)
            )
            return outputs.hidden_states[-self.clip_l_layer_from_end], None
        hidden = clip_l.layer == "hidden"
        outputs = self._run(
            "clip_l", lambda: clip_l.transformer(input_ids=tokens, output_hidden_states=hidden)
        )
        if clip_l.layer == "last":
            return outputs.last_hidden_state, None
        return outputs.hidden_states[clip_l.layer_idx], None

    def _bigg_chunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bigg = self._bigg
        outputs = self._run("clip_g", lambda: bigg.encode_with_transformer(tokens))
        return outputs[bigg.layer], outputs["pooled"]

    # --- the UNet's vector input ---------------------------------------------------------------------------

    def size_values(self, height_px: int, width_px: int) -> dict[str, tuple[int, int]]:
        """The WebUI's size and crop conditioning for an image of this size (sd_models_xl.py
        `get_learned_conditioning`): original = target = (height, width), crop = its settings."""
        return {
            ORIGINAL_SIZE: (height_px, width_px),
            CROP: self.crop_top_left,
            TARGET_SIZE: (height_px, width_px),
        }

    def unet_conditioning(
        self, cond: TextConditioning, height_px: int, width_px: int
    ) -> dict[str, torch.Tensor]:
        """sgm's conditioning dict: `crossattn` = the text's hidden states; `vector` = the 2-D outputs in the
        conditioner's embedder order (pooled text, then the size embedders), as GeneralConditioner sorts them."""
        batch = cond.hidden.shape[0]
        values = self.size_values(height_px, width_px)
        parts = []
        for embedder in self.model.conditioner.embedders:
            if embedder is self._bigg_wrapper:
                parts.append(cond.pooled)
            elif getattr(embedder, "input_key", None) in values:
                rows = torch.tensor([values[embedder.input_key]] * batch, device=cond.pooled.device)
                with self.compute_context():
                    parts.append(embedder(rows))
        dtype = cond.pooled.dtype
        return {"crossattn": cond.hidden, "vector": torch.cat([part.to(dtype) for part in parts], dim=1)}

    # --- images and the UNet ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        """The VAE's distribution in fp32 (SDXL's VAE overflows in fp16), times the scale factor once.

        sgm's `encode` returns a sample, so the distribution is read from the encoder and `quant_conv` (the
        same moments `DiagonalGaussianDistribution` takes). The VAE is moved here by us: calling its parts
        directly bypasses --medvram-sdxl's wrappers, which would only sample anyway."""
        vae = self.model.first_stage_model
        with on_device(vae, self.device), weights_in(torch.float32, vae):
            moments = vae.quant_conv(vae.encoder(pixels.to(self.device, torch.float32)))
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        scale = float(self.model.scale_factor)
        return LatentDistribution((mean * scale).float().cpu(), (std * scale).float().cpu())

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning
    ) -> torch.Tensor:
        """The UNet's noise prediction through the engine's `apply_model` (the wrapper: crossattn -> context,
        vector -> y), with the size conditioning of the latents' size."""
        factor = self.family.vae_scale_factor
        height, width = noisy_latents.shape[-2] * factor, noisy_latents.shape[-1] * factor
        conditioning = self.unet_conditioning(cond, height, width)
        dtype = self._unet_compute_dtype()
        conditioning = {key: value.to(self.device, dtype) for key, value in conditioning.items()}
        with self.compute_context(), self._half_precision_guard(dtype):
            return self.model.apply_model(
                noisy_latents.to(self.device, dtype), timesteps.to(self.device), conditioning
            )

    def _unet_compute_dtype(self) -> torch.dtype:
        for parameter in self.model.model.diffusion_model.parameters():
            if not _is_fp8(parameter):
                return parameter.dtype
        return torch.float32

    def _half_precision_guard(self, dtype: torch.dtype):
        """The WebUI keeps its model in fp16 and computes under autocast; do the same when the caller has
        no autocast of its own (an fp16 UNet cannot take fp32 timestep embeddings otherwise)."""
        half = dtype in (torch.float16, torch.bfloat16)
        if self.device.type == "cuda" and half and not torch.is_autocast_enabled():
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def render(self, request: PreviewRequest) -> None:
        """None: in the WebUI, previews go through its own txt2img (host/a1111.py `render_preview`)."""
        return None


def _text_wrappers(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The WebUI's two text wrappers inside sgm's conditioner (CLIP-L's, then bigG's), or a clear refusal."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is None:
        raise ValueError("SgmBackend takes an SDXL model (one with a conditioner); use LdmBackend otherwise")
    if getattr(model, "is_sdxl_inpaint", False):
        raise UserError(
            "The loaded model is an SDXL inpainting model. Train on the SDXL base model it was made from: "
            "embeddings trained there work with it too."
        )
    if getattr(model, "parameterization", None) not in ("eps", "v"):
        raise UserError(
            f"The loaded model predicts {getattr(model, 'parameterization', None)!r}; this trainer handles "
            "noise (eps) and v-prediction models."
        )
    texts = [embedder for embedder in conditioner.embedders if hasattr(embedder, "process_texts")]
    pooled = [embedder for embedder in texts if getattr(embedder, "return_pooled", False)]
    if len(texts) != 2 or len(pooled) != 1 or texts[1] is not pooled[0] or not hasattr(texts[0], "wrapped"):
        raise UserError(
            "The loaded SDXL model does not have SDXL base's two text encoders as the WebUI wraps them (CLIP "
            "ViT-L, then OpenCLIP ViT-bigG): a refiner, or a text encoder replaced by another extension. Load "
            "an SDXL base model in the checkpoint dropdown at the top of the WebUI and try again."
        )
    return texts[0], texts[1]
