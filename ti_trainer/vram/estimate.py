"""The peak GPU memory of one training step, and the largest batch that fits, without a GPU.

The model (a named architecture, or the loaded one's configs) is built on the meta device; one training step
runs on it as the loop runs it (the prompt with the embedding's vectors injected through the text encoder(s),
the UNet, the fp32 loss, the backward pass to the vectors), under the levers the run would use (attention
processors, the UNet blocks' checkpointing), with CUDA autocast's casts reproduced, while tally.LiveBytes
counts the bytes alive. Weights are counted once, in the dtype they are stored in on the GPU.

What the figures compare to:
- `allocated_bytes`: the weights plus the step's peak, each block rounded as the CUDA caching allocator
  rounds it: the figure to set beside `torch.cuda.max_memory_allocated()` for the same step.
- `needed_bytes`: what the allocator must be able to reserve: `allocated_bytes` plus allowances (assumptions,
  not measurements; benchmarks/bench_training.py measures them): ACTIVATION_FRAGMENTATION of the step's
  activations for the caching allocator's partly used blocks, and KERNEL_WORKSPACE_BYTES for cuBLAS/cuDNN
  workspaces, which no op returns. Neither counts the CUDA context (0.3 to 0.5 GiB, outside PyTorch's
  allocator) or the desktop's own use of the card: the budget is what is left for PyTorch, hence the default
  of 7.5 GiB for an 8 GB card.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

from ti_trainer.vram.architectures import Architecture, MetaModel, build_on_meta
from ti_trainer.vram.tally import (
    FP8,
    LiveBytes,
    allocator_rounded,
    emulated_autocast,
)

GIB = 1024**3
ACTIVATION_FRAGMENTATION = 0.10
KERNEL_WORKSPACE_BYTES = 128 * 1024**2
DEFAULT_BUDGET_GIB = 7.5
CHECKPOINT_LEVELS = ("off", "high-res", "all")
PROMPT_TOKENS = 77
VECTORS_OFFSET = 2  # where the embedding's name sits in the probe prompt (after the start token and a word)


@dataclass(frozen=True)
class Settings:
    """A run's settings as far as memory goes (the GPU side of a MemoryPlan, plus what-ifs)."""

    width: int = 512
    height: int = 512
    batch: int = 1
    precision: str = "bf16"  # "fp32" | "bf16" | "fp16" (autocast dtype; fp32: no autocast)
    attention: str = "sdpa"  # "sdpa" | "xformers" (the same memory) | "math" (scores materialised)
    checkpointing: str = "off"  # "off" | "high-res" | "all"
    upcast_attention: bool = False  # attention in fp32 (SD 2.1's NaN guard under fp16)
    half_weights: bool = True  # frozen weights stored in the autocast dtype (the plan's default on a GPU)
    fp8_weights: bool = False  # linear and conv weights stored in fp8, cast to the compute dtype when used
    vae_on_gpu: bool = False  # its weights only: latents are cached before training
    text_encoder_on_gpu: bool = True
    # SDXL's lever (memory/plan.py `text_encoders_lent`): the text encoders' weights wait in RAM (not resident)
    # and each encoder comes to the GPU for its own forward; what its backward keeps waits in RAM meanwhile.
    text_encoders_lent: bool = False
    num_vectors: int = 1
    trainable_unet: bool = False  # A1111's own trainer leaves the UNet trainable (weight gradients kept)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def text_encoders_resident(self) -> bool:
        """The text encoders' weights sit on the GPU for the whole step."""
        return self.text_encoder_on_gpu and not self.text_encoders_lent

    @property
    def weights_dtype(self) -> torch.dtype:
        if self.half_weights and self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float32

    def with_batch(self, batch: int) -> Settings:
        return replace(self, batch=batch)


def a1111_settings(width: int = 768, height: int = 768, batch: int = 1) -> Settings:
    """What A1111's built-in trainer runs (reference/a1111.md §1.5, §2; the `a1111` configuration of
    benchmarks/bench_training.py): fp16 weights (`model.half()`) with the UNet left trainable, plain attention
    without upcast (its optimizations are off while training), fp16 autocast, every UNet block checkpointed
    (ldm's use_checkpoint), the VAE on the GPU."""
    return Settings(
        width=width,
        height=height,
        batch=batch,
        precision="fp16",
        attention="math",
        checkpointing="all",
        upcast_attention=False,
        half_weights=True,
        vae_on_gpu=True,
        trainable_unet=True,
    )


@dataclass(frozen=True)
class Estimate:
    model: str
    settings: Settings
    weights_bytes: int  # resident on the GPU: UNet, text encoder(s) when there, VAE when there
    step_bytes: int  # the step's peak above the weights, allocator-rounded
    step_bytes_exact: int  # the same, as the tensors' sizes add up (what a CPU measurement compares to)
    peak_op: str  # the op at which the peak was reached

    @property
    def allocated_bytes(self) -> int:
        """Comparable to torch.cuda.max_memory_allocated() for the step."""
        return self.weights_bytes + self.step_bytes

    @property
    def needed_bytes(self) -> int:
        """What must fit in the budget: allocated plus the allocator's and the kernels' allowances."""
        return self.allocated_bytes + int(self.step_bytes * ACTIVATION_FRAGMENTATION) + KERNEL_WORKSPACE_BYTES

    @property
    def needed_gib(self) -> float:
        return self.needed_bytes / GIB

    def fits(self, budget_bytes: int) -> bool:
        return self.needed_bytes <= budget_bytes


def estimate_step_bytes(model, settings: Settings) -> Estimate:
    """The peak GPU memory of one training step of `model` (an Architecture, a named architecture such as
    "sd21-768", or a loaded backend) under `settings`."""
    from ti_trainer.vram.architectures import architecture_of_backend, named_architecture

    if isinstance(model, str):
        architecture = named_architecture(model)
    elif isinstance(model, Architecture):
        architecture = model
    else:
        architecture = architecture_of_backend(model)
    meta = build_on_meta(architecture)
    store_weights(meta, settings)
    weights = resident_weight_bytes(meta, settings)
    tally = LiveBytes()
    with levers(meta, settings):
        run_step(meta, settings, tally)
    return Estimate(architecture.title, settings, weights, tally.peak_rounded, tally.peak, tally.peak_op)


def store_weights(meta: MetaModel, settings: Settings) -> None:
    """Weights in the dtype the run stores them in; fp8: linear and conv weights in float8 (Forge's and
    A1111's fp8 storage leaves norms, biases and embeddings in the half dtype)."""
    for module in (meta.unet, meta.vae, *meta.text_encoders):
        torch.nn.Module.to(module, settings.weights_dtype)
    if settings.fp8_weights:
        if FP8 is None:
            from ti_trainer.errors import UserError

            raise UserError("fp8 weight storage needs torch 2.1 or newer (torch.float8_e4m3fn).")
        for module in (meta.unet, *meta.text_encoders):
            for layer in module.modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    layer.weight.data = layer.weight.data.to(FP8)
    if settings.trainable_unet:
        meta.unet.requires_grad_(True)


def resident_weight_bytes(meta: MetaModel, settings: Settings) -> int:
    modules = [meta.unet]
    if settings.text_encoders_resident:
        modules += meta.text_encoders
    if settings.vae_on_gpu:
        modules.append(meta.vae)
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            seen[storage._cdata] = allocator_rounded(storage.nbytes())
    return sum(seen.values())


@contextlib.contextmanager
def levers(meta: MetaModel, settings: Settings):
    """The run's attention processors and checkpointing on the meta UNet (the backends' own levers, as they
    are: their checkpoint calls reach tally.checkpoint_under_emulation while the step runs). xformers is
    accounted as SDPA: both are memory-efficient kernels with the same saved tensors."""
    from ti_trainer.backends.diffusers_memory import attention_processors, unet_checkpointing

    kind = "sdpa" if settings.attention == "xformers" else settings.attention
    with (
        attention_processors(meta.unet, kind, settings.upcast_attention),
        unet_checkpointing(meta.unet, settings.checkpointing),
    ):
        yield


def run_step(meta: MetaModel, settings: Settings, tally: LiveBytes | None, device: str = "meta") -> None:
    """One training step, as training/loop.py and fit.training_step_probe run it. On the meta device under
    `tally` and the emulated CUDA autocast; on a real device (the cross-check in the tests) as it is."""
    architecture, batch = meta.architecture, settings.batch
    compute = settings.compute_dtype
    # The UNet's inputs are cast to its weights' dtype (backend.predict); fp8 weights compute in the half dtype.
    unet_input = (compute or torch.float32) if settings.fp8_weights else settings.weights_dtype
    factor = 2 ** (len(architecture.vae["block_out_channels"]) - 1)
    channels = int(architecture.unet.get("in_channels", 4))
    latent_shape = (batch, channels, settings.height // factor, settings.width // factor)
    emulating = device == "meta"
    counter = tally if tally is not None else LiveBytes()
    with torch.device(device), tally if tally is not None else contextlib.nullcontext():
        vectors = [
            torch.zeros(settings.num_vectors, int(config["hidden_size"]), requires_grad=True)
            for config in architecture.text_encoders
        ]
        latents, noise = torch.randn(latent_shape), torch.randn(latent_shape)
        timesteps = torch.full((batch,), 500, dtype=torch.long)
        noisy, target = latents * 0.9 + noise * 0.1, noise * 0.9 - latents * 0.1
        with emulated_autocast(compute) if emulating else contextlib.nullcontext():
            lent = settings.text_encoders_lent and emulating
            counter.counting = settings.text_encoder_on_gpu or lent
            cond, added = encode_prompt(meta, vectors, batch, lent=lent)
            if not counter.counting:
                cond, added = on_gpu_from_here(cond, added, counter)
            prediction = meta.unet(
                noisy.to(unet_input),
                timesteps,
                encoder_hidden_states=cond.to(unet_input),
                added_cond_kwargs=added,
            ).sample
        from ti_trainer.diffusion import denoising_loss

        denoising_loss(prediction, target).backward()


def on_gpu_from_here(cond, added, tally: LiveBytes):
    """The text encoder ran on the CPU (not counted): its output is copied to the GPU, and once the gradient
    reaches that copy in the backward pass, the rest of the backward runs on the CPU again."""
    tally.counting = True
    cond = cond.clone()
    added = {key: value.clone() for key, value in added.items()} if added else added

    def back_on_cpu(grad):
        tally.counting = False
        return grad

    cond.register_hook(back_on_cpu)
    return cond, added


@contextlib.contextmanager
def lent_on_meta(encoder: torch.nn.Module):
    """memory/plan.py `text_encoder_lent`, as the tally sees it: copies of the encoder's weights arrive for its
    forward (counted while it runs), and what its backward keeps leaves for RAM (memory/saved_in_ram.py: no
    longer counted) until the backward brings it back (counted again, then)."""

    def pack(tensor: torch.Tensor):
        return tensor.shape, tensor.dtype, tensor.device

    def unpack(packed) -> torch.Tensor:
        shape, dtype, device = packed
        return torch.empty(shape, dtype=dtype, device=device)

    copies = [torch.empty_like(tensor) for tensor in (*encoder.parameters(), *encoder.buffers())]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        del copies


def encode_prompt(meta: MetaModel, vectors: list[torch.Tensor], batch: int, lent: bool = False):
    """The conditioning (and SDXL's pooled embedding and size ids) for a batch of 77-token prompts, each with
    the embedding's vectors injected into every encoder's token embedding; `lent`: each encoder lent to the
    GPU for its forward (on the meta device only)."""
    from ti_trainer.text.conditioning import InjectingTokenEmbedding, injector_installed

    architecture = meta.architecture
    ids = torch.zeros(batch, PROMPT_TOKENS, dtype=torch.long)
    hidden, pooled = [], None
    for encoder, own_vectors in zip(meta.text_encoders, vectors):
        text_model = getattr(encoder, "text_model", encoder)
        injector = InjectingTokenEmbedding(text_model.embeddings.token_embedding)
        with (
            injector_installed(injector, text_model.embeddings, "token_embedding"),
            lent_on_meta(encoder) if lent else contextlib.nullcontext(),
        ):
            injector.fixes = [[(VECTORS_OFFSET, own_vectors)] for _ in range(batch)]
            out = encoder(input_ids=ids, output_hidden_states=architecture.text_layer != "last")
        if architecture.text_layer == "last":
            hidden.append(out.last_hidden_state)
        elif architecture.text_layer == "penultimate+norm":
            hidden.append(text_model.final_layer_norm(out.hidden_states[-2]))
        else:
            hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    cond = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
    if not architecture.pooled_text:
        return cond, None
    return cond, {"text_embeds": pooled, "time_ids": torch.zeros(batch, 6, dtype=cond.dtype)}


# --- what fits -----------------------------------------------------------------------------------------------


def largest_batch(
    model, settings: Settings, budget_bytes: int, limit: int = 64, known: dict[int, Estimate] | None = None
) -> tuple[int, Estimate | None]:
    """The largest batch <= `limit` whose estimate fits `budget_bytes` (0 and None if not even batch 1).
    `known`: estimates already made for these settings, by batch (they are reused, and new ones added).

    Every activation has the batch as a dimension, so the step's bytes grow about linearly with it: batches
    1 and 2 give the slope, and the batch it points to is confirmed (and corrected one at a time) with its own
    estimate (the peak may move to another point of the step as the batch grows, so the line is only a guess).
    """
    known = {} if known is None else known

    def at(batch: int) -> Estimate:
        if batch not in known:
            known[batch] = estimate_step_bytes(model, settings.with_batch(batch))
        return known[batch]

    first = at(1)
    if not first.fits(budget_bytes):
        return 0, None
    if limit == 1:
        return 1, first
    slope = max(1, at(2).needed_bytes - first.needed_bytes)
    guess = max(1, min(limit, 1 + math.floor((budget_bytes - first.needed_bytes) / slope)))
    while guess > 1 and not at(guess).fits(budget_bytes):
        guess -= 1
    while guess < limit and at(guess + 1).fits(budget_bytes):
        guess += 1
    return guess, at(guess)


def least_checkpointing(model, settings: Settings, budget_bytes: int) -> Estimate | None:
    """The estimate at the least checkpointing (off, high-res, all) at which `settings.batch` fits; None if
    it fits at none. Where 'auto' checkpointing starts, instead of from an out-of-memory error."""
    for level in CHECKPOINT_LEVELS:
        estimate = estimate_step_bytes(model, replace(settings, checkpointing=level))
        if estimate.fits(budget_bytes):
            return estimate
    return None
