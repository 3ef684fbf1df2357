"""What both Forge backends borrow of the model Forge has loaded (reference/forge.md), and how it goes back.

ForgeBackend (SD 1.x / 2.x, backends/forge_backend.py) and ForgeXLBackend (SDXL, backends/forge_xl_backend.py)
each hold a `ForgeLoan` and delegate to it; they differ only in their text path, their family and what the UNet
takes besides the text. Forge's model object keeps its parts in `forge_objects` (the base model's in
`forge_objects_original`): the UNet's patcher (`unet.model` is a KModel: `diffusion_model` and `predictor`),
the text encoders' (`clip.patcher`) and the VAE (`vae`). What the loan uses of each:

- Schedule: the predictor's `alphas_cumprod` and prediction type.
- UNet: `diffusion_model(x_t, t, context=...)` called directly (with `y=` for SDXL), in Forge's computation
  dtype, with the raw eps/v output: A1111's TI loss (KModel.apply_model would return x0 and weight timesteps
  otherwise).
- Text: each engine's `encode_with_transformers` at the "Clip skip" generation uses; and, as free functions,
  what both text paths read of an engine (our chunker over its tokenizer and ids, its token table, the adapter
  that hands the trainable vectors to Forge's token-embedding wrapper as an embedding's `vec` would be).
- VAE: the posterior's mean and standard deviation, through Forge's patcher and scale (in the VAE dtype Forge
  chose).
- Memory: Forge's (backends/forge_memory.py): before a step, the UNet and the text encoders are asked for
  together, with room for the backward pass; Forge's budget and offload settings stay in force, and what it
  had loaded is given back after the run. The plan's checkpointing goes on Forge's UNet; attention and weight
  dtypes are Forge's own settings and stay as they are (`describe_memory` says so in the run's "Memory:" line).
  The room is what the host's `step_memory` says a step at that shape needs beyond the weights (the VRAM
  estimate on the meta device, handed in by host/forge.py: backends/ lies below vram/), worked out once per
  (shape, plan); where it cannot be made, Forge's own forward estimate times BACKWARD_FACTOR.

The model is borrowed: `training_session()` makes it trainable (Forge's inference-mode weights, its in-place
residual adds) and gives it back as found, after success, an error or an Interrupt. `memory_management` is
Forge's module, handed in by host/forge.py; nothing here imports Forge.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from ti_trainer.backends.borrowed_model import SessionDepth
from ti_trainer.backends.contract import LatentDistribution
from ti_trainer.backends.forge_memory import (
    TrainableWeights,
    backward_bytes,
    dtype_words,
    forge_checkpointing,
    forge_memory_in_words,
    in_place_safe,
    loaded_state,
    restore_loaded,
)
from ti_trainer.diffusion import NoiseSchedule
from ti_trainer.errors import UserError
from ti_trainer.memory.plan import MemoryPlan
from ti_trainer.text.conditioning import PromptChunker, TextRules, TokenIds

FORGE_COMMA_BACKTRACK = 20  # classic_engine.tokenize_line fixes it; Forge has no setting for it
PARAMETERIZATIONS = {"epsilon": "eps", "v_prediction": "v"}
# The room a training step needs on the GPU beyond the weights, in bytes, under a plan at a latent shape
# [batch, channels, height, width]: the host's VRAM estimate (it may raise: then the factor stands in).
StepMemory = Callable[[MemoryPlan, tuple[int, ...]], int]


def bound(step_memory: Callable[..., int] | None, backend) -> StepMemory | None:
    """A host's `step_memory(plan, latent_shape, backend)` for one backend, as the loan calls it."""
    if step_memory is None:
        return None
    return functools.partial(step_memory, backend=backend)


class ForgeLoan:
    """Forge's loaded model lent to one backend: its parts, schedule and text engines, the memory asked of
    Forge for each step, and the session that gives it all back."""

    def __init__(
        self,
        model,
        memory_management: ModuleType,
        engines: list,
        clip_skip: int,
        step_memory: StepMemory | None = None,
    ):
        """`model` is Forge's loaded model; `memory_management` is Forge's `backend.memory_management`;
        `engines` are the text engines the backend encodes with (a session gives back their pending fixes);
        `clip_skip` is Forge's "Clip skip" setting, which its txt2img sets on every engine; `step_memory`
        sizes the room asked for a step's backward pass (None: Forge's forward estimate x BACKWARD_FACTOR)."""
        objects = model.forge_objects_original or model.forge_objects
        self.model = model
        self.memory_management = memory_management
        self.unet_patcher, self.clip, self.vae = objects.unet, objects.clip, objects.vae
        self.engines = engines
        self.device = torch.device(memory_management.get_torch_device())
        self.clip_skip = max(1, int(clip_skip))
        predictor = self.unet_patcher.model.predictor
        self.schedule = NoiseSchedule(
            predictor.alphas_cumprod.detach().double().cpu(), PARAMETERIZATIONS[predictor.prediction_type]
        )
        self._sessions = SessionDepth()
        self._weights: TrainableWeights | None = None
        self._plan: MemoryPlan | None = None  # the plan applied (memory_levers); None: no lever applied
        self.step_memory = step_memory
        self._rooms: dict[tuple[MemoryPlan | None, tuple[int, ...]], int] = {}  # once per (plan, shape)
        self._requested: int | None = (
            None  # memory_required last asked of Forge; None: ask before the next step
        )
        self._needed = 0  # the room the largest batch so far needs for its backward pass

    @property
    def unet(self) -> torch.nn.Module:
        return self.unet_patcher.model.diffusion_model

    # --- the borrowed model -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training_session(self) -> Iterator[None]:
        """Make Forge's model trainable for a run and give it back as found, however the block ends: its
        weights the inference tensors they were (the same storage, frozen values), requires_grad, gradients
        and train/eval flags, the engines' pending fixes, and the models Forge had loaded. Re-entrant."""
        with self._sessions.enter(self._borrowed):
            yield

    @contextlib.contextmanager
    def _borrowed(self) -> Iterator[None]:
        parts = [self.unet_patcher.model, self.clip.cond_stage_model]
        with contextlib.ExitStack() as stack:
            # Unwound in reverse: the loaded models go back while the weights are still ordinary tensors
            # (Forge moves them outside inference mode), then the weights become inference tensors again.
            databases = [engine.embeddings for engine in self.engines]
            stack.callback(_restore_flags, parts, _flags(parts), [(db, db.fixes) for db in databases])
            self._weights = stack.enter_context(TrainableWeights(parts))
            stack.callback(restore_loaded, self.memory_management, loaded_state(self.memory_management))
            stack.enter_context(in_place_safe(self.unet))
            stack.callback(self._end_session)
            for part in parts:
                part.requires_grad_(False)
            self._requested = None
            yield

    def _end_session(self) -> None:
        self._weights, self._requested = None, None

    def _ready_for_step(self, latent_shape: torch.Size | None) -> None:
        """Ask Forge for the UNet and the text encoders together, with room for the backward pass of the
        largest batch seen (`latent_shape`: this one; None: the text encoders run first and the batch is not
        known yet), unless asked for at least that much since Forge last had the GPU. Weights Forge re-created
        in inference mode meanwhile are made trainable again."""
        needed = self._needed
        if latent_shape is not None:
            needed = max(needed, self.step_room(tuple(latent_shape)))
        if self._requested is not None and needed <= self._requested:
            return
        self.memory_management.load_models_gpu([self.unet_patcher, self.clip.patcher], memory_required=needed)
        self._requested = self._needed = needed
        if self._weights is not None:
            self._weights.refresh()

    def step_room(self, latent_shape: tuple[int, ...]) -> int:
        """The room asked of Forge for a training step at `latent_shape` beyond the weights, under the plan
        applied: the host's estimate, made once per (plan, shape) (it takes seconds: never per step); where
        it cannot be made, Forge's own forward estimate x BACKWARD_FACTOR."""
        key = (self._plan, latent_shape)
        if key not in self._rooms:
            estimated = self._estimated_room(latent_shape)
            if estimated is None:
                forward = self.unet_patcher.memory_required(list(latent_shape))
                level = self._plan.checkpointing if self._plan is not None else "off"
                estimated = backward_bytes(forward, level)
            self._rooms[key] = estimated
        return self._rooms[key]

    def _estimated_room(self, latent_shape: tuple[int, ...]) -> int | None:
        if self.step_memory is None or self._plan is None:
            return None
        # Asked from inside a step (its forward has begun, perhaps under autocast or no_grad): the estimate
        # runs its own step on the meta device, with gradients and without the real autocast.
        try:
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast(self.device.type, enabled=False),
            ):
                return int(self.step_memory(self._plan, latent_shape))
        except Exception:  # advice only: a failing estimate must never stop a run (the factor stands in)
            return None

    # --- memory ------------------------------------------------------------------------------------------------

    @property
    def preferred_precision(self) -> str | None:
        """Compute in the dtype Forge computes the UNet in, so no converted copy of its weights is made."""
        dtype = self.unet_patcher.model.computation_dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)

    def describe_memory(self, plan: MemoryPlan) -> str:
        """The plan as it applies in Forge: checkpointing and the precision computed in are the trainer's;
        attention, weight storage and placement Forge's (its settings and memory manager), read from it."""
        computes = dtype_words(self.unet_patcher.model.computation_dtype)
        precision = plan.precision_words
        if plan.precision == computes:
            precision += " (Forge's computation dtype)"
        else:
            precision += f" (the UNet computing in Forge's {computes})"
        forge = forge_memory_in_words(self.memory_management, self.unet_patcher.model.storage_dtype)
        return f"{plan.checkpointing_words}, {precision}; attention, weight storage and placement are Forge's: {forge}"

    @contextlib.contextmanager
    def memory_levers(self, plan: MemoryPlan) -> Iterator[None]:
        """The plan's checkpointing on Forge's UNet (and the room asked for the backward pass sized by it).
        Attention, weight dtypes and placement stay Forge's: its settings and its memory manager decide."""
        self._plan, self._requested, self._needed = plan, None, 0
        try:
            with forge_checkpointing(self.unet, plan.checkpointing):
                yield
        finally:
            self._plan, self._requested, self._needed = None, None, 0

    @contextlib.contextmanager
    def previewing(self) -> Iterator[None]:
        """A preview through Forge's txt2img loads what it needs itself; the next step asks again."""
        try:
            yield
        finally:
            self._requested = None

    # --- computing on the borrowed model ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> LatentDistribution:
        vae = self.vae
        memory = vae.memory_used_encode(pixels.shape, vae.vae_dtype)
        self.memory_management.load_models_gpu([vae.patcher], memory_required=memory)
        self._requested = None  # loading the VAE may have displaced the UNet or the text encoders
        autoencoder = vae.first_stage_model
        posterior = autoencoder.encode(pixels.to(vae.device, vae.vae_dtype), regulation=lambda p: p)
        mean = autoencoder.process_in(posterior.mean.float())
        std = posterior.std.float() * autoencoder.scaling_factor
        return LatentDistribution(mean.cpu(), std.cpu())

    def unet_forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, **conditioning
    ) -> torch.Tensor:
        """The UNet's raw output, in Forge's computation dtype, its inputs (`y=` for SDXL) cast to it."""
        self._ready_for_step(noisy_latents.shape)
        dtype = self.unet_patcher.model.computation_dtype
        return self.unet(
            noisy_latents.to(self.device, dtype),
            timesteps.to(self.device).float(),
            context=context.to(self.device, dtype),
            transformer_options={},  # a fresh dict: Forge's UNet writes into the one it is given
            **{key: value.to(self.device, dtype) for key, value in conditioning.items()},
        )

    def engine_forward(self, engine, tokens: torch.Tensor) -> torch.Tensor:
        """`engine`'s transformer pass over `[B, 77]` ids, at the "Clip skip" generation uses (Forge's
        txt2img sets it on the engine from the setting; it is put back as it was)."""
        self._ready_for_step(None)
        clip_skip, engine.clip_skip = engine.clip_skip, self.clip_skip
        try:
            return engine.encode_with_transformers(tokens)
        finally:
            engine.clip_skip = clip_skip


# --- Forge's text engines, as both text paths read them ------------------------------------------------------


class _Vectors:
    """What Forge's token-embedding wrapper reads of an embedding: its `.vec`."""

    def __init__(self, vec: torch.Tensor):
        self.vec = vec


class EngineFixes:
    """Hands the prompt encoder's vectors to Forge's token-embedding wrapper (CLIPEmbeddingForTextualInversion)
    the way Forge's engine hands it an embedding: `embeddings.fixes`, per prompt a list of (offset, embedding).
    The wrapper reads and clears it at its next forward."""

    def __init__(self, database):
        self.database = database

    @property
    def fixes(self):
        return self.database.fixes

    @fixes.setter
    def fixes(self, fixes) -> None:
        if fixes is not None:
            fixes = [[(offset, _Vectors(vectors)) for offset, vectors in row] for row in fixes]
        self.database.fixes = fixes


def engine_chunker(engine, emphasis: str) -> PromptChunker:
    """Our chunker over a Forge text engine's tokenizer and ids, with its fixed comma back-off."""
    ids = TokenIds(start=engine.id_start, end=engine.id_end, pad=engine.id_pad, comma=engine.comma_token)
    return PromptChunker(engine.tokenize, ids, TextRules(emphasis, FORGE_COMMA_BACKTRACK))


def token_table(engine) -> torch.nn.Embedding:
    """The plain token-embedding table of an engine's text model, under Forge's textual-inversion wrapper."""
    layer = engine.text_encoder.transformer.text_model.embeddings.token_embedding
    while not isinstance(layer, torch.nn.Embedding):
        layer = layer.wrapped
    return layer


def token_rows(engine, ids: list[int]) -> torch.Tensor:
    """The rows of an engine's token table for `ids`, fp32 on the CPU."""
    weight = token_table(engine).weight
    return weight[torch.tensor(ids, dtype=torch.long, device=weight.device)].detach().float().cpu()


# --- what the session gives back, and what no Forge backend trains ---------------------------------------------


def _flags(parts: list[torch.nn.Module]) -> dict:
    """requires_grad and whether a gradient is held, per (module, parameter name), and train/eval modes."""
    return {
        "parameters": [
            (owner, name, parameter.requires_grad, parameter.grad is not None)
            for part in parts
            for owner in part.modules()
            for name, parameter in owner._parameters.items()
            if parameter is not None
        ],
        "modes": [(module, module.training) for part in parts for module in part.modules()],
    }


def _restore_flags(parts, flags: dict, pending_fixes: list) -> None:
    for owner, name, requires_grad, had_grad in flags["parameters"]:
        parameter = owner._parameters.get(name)
        if parameter is None or parameter.is_inference():  # given back by TrainableWeights with its flag
            continue
        parameter.requires_grad_(requires_grad)
        if not had_grad:
            parameter.grad = None
    for module, training in flags["modes"]:
        module.training = training
    for database, fixes in pending_fixes:
        database.fixes = fixes


def check_trainable(model) -> None:
    """Refuse, with a message, what no Forge backend trains: inpainting models and other predictions."""
    if getattr(model, "is_inpaint", False):
        raise UserError(
            "The loaded model is an inpainting model. Train on the base model it was made from: embeddings "
            "trained there work with it too."
        )
    prediction = getattr(model.forge_objects.unet.model.predictor, "prediction_type", None)
    if prediction not in PARAMETERIZATIONS:
        raise UserError(
            f"The loaded model predicts {prediction!r}; this trainer handles noise (epsilon) and "
            "v-prediction models."
        )
