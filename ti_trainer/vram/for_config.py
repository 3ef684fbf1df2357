"""The estimate for a TrainConfig on a backend, and in one sentence for the planner, the Train panel and the
out-of-memory message. Estimates are cached: the panels may ask again on every change of a field."""

from __future__ import annotations

import dataclasses

from ti_trainer.memory.plan import MemoryPlan, choose_memory_plan, escalation, lending_asked, plan_for
from ti_trainer.vram.architectures import Architecture, architecture_of_backend
from ti_trainer.vram.estimate import (
    DEFAULT_BUDGET_GIB,
    GIB,
    Estimate,
    Settings,
    estimate_step_bytes,
)

CHECKPOINTING_WORDS = {
    "off": "without checkpointing",
    "high-res": "with the high-resolution blocks checkpointed",
    "all": "with checkpointing",
}


def gpu_plan(config, backend) -> MemoryPlan:
    """The plan the run would get on a GPU: the backend's own when it is on one; otherwise (planning before
    any GPU is used) the GPU defaults: bf16 (fp16 costs the same memory), weights in that dtype."""
    if backend.device.type == "cuda":
        return plan_for(config, backend)
    precision = config.precision
    if precision == "auto":
        precision = backend.preferred_precision or "bf16"
    plan = choose_memory_plan(
        "cpu",
        precision=precision,
        attention="sdpa" if config.attention in ("auto", "xformers") else config.attention,
        checkpointing=config.gradient_checkpointing,
        upcast_attention=config.upcast_attention,
        model_upcasts_attention=backend.upcasts_attention,
    )
    return dataclasses.replace(
        plan,
        vae_offload=config.vae_offload,
        half_weights=plan.precision != "fp32",
        text_encoders_lent=lending_asked(config, backend) == "on",
    )


def plans_by_need(config, backend, plan: MemoryPlan) -> list[MemoryPlan]:
    """The plans a run of `config` may be raised to by need, least costly first (memory/plan.py
    `escalation`): the run's probes (fit.memory_for_training) go through the same."""
    return escalation(
        plan,
        checkpointing=config.gradient_checkpointing == "auto",
        lending=lending_asked(config, backend) == "auto",
    )


def settings_for(config, plan: MemoryPlan, num_vectors: int = 1) -> Settings:
    return settings_for_plan(plan, config.width, config.height, config.batch_size, num_vectors)


def settings_for_plan(
    plan: MemoryPlan, width: int, height: int, batch: int, num_vectors: int = 1
) -> Settings:
    return Settings(
        width=width,
        height=height,
        batch=batch,
        precision=plan.precision,
        attention=plan.attention,
        checkpointing=plan.checkpointing,
        upcast_attention=plan.upcast_attention,
        half_weights=plan.half_weights,
        vae_on_gpu=not plan.vae_offload,
        text_encoder_on_gpu=not plan.text_encoders_lent,
        text_encoders_lent=plan.text_encoders_lent,
        num_vectors=num_vectors,
    )


def estimate_for_config(
    config, backend, budget_gib: float = DEFAULT_BUDGET_GIB, num_vectors: int = 1
) -> Estimate:
    """The estimate for the run `config` describes on `backend`'s model. With "auto" levers: at the least
    costly plan whose estimate fits `budget_gib` (or the most saving one, if none does), which is where the
    run's own search (fit.memory_for_training) can start."""
    architecture = architecture_of_backend(backend)
    for plan in plans_by_need(config, backend, gpu_plan(config, backend)):
        estimate = cached_estimate(architecture, settings_for(config, plan, num_vectors))
        if estimate.fits(int(budget_gib * GIB)):
            return estimate
    return estimate


def largest_batch_for_config(
    config, backend, budget_gib: float = DEFAULT_BUDGET_GIB, num_vectors: int = 1, limit: int = 64
) -> int:
    """The largest batch the estimate says fits `budget_gib` at the config's size (its plan, or on "auto"
    levers the plan that fits the most): the number the planner's splits are built from."""
    from ti_trainer.vram.estimate import largest_batch

    architecture = architecture_of_backend(backend)
    budget = int(budget_gib * GIB)
    plans = plans_by_need(config, backend, gpu_plan(config, backend))
    # Where a level may lend, only its lent plan: it never needs more than the same level unlent (lent, the
    # encoders' weights are on the GPU only while they compute, never beside the UNet's step), and each plan
    # here costs several estimates of a few seconds.
    lent_levels = {plan.checkpointing for plan in plans if plan.text_encoders_lent}
    plans = [plan for plan in plans if plan.text_encoders_lent or plan.checkpointing not in lent_levels]
    return max(
        largest_batch(architecture, settings_for(config, plan, num_vectors), budget, limit)[0]
        for plan in plans
    )


_CACHE: dict[tuple[str, Settings], Estimate] = {}
CACHE_SIZE = 64


def cached_estimate(architecture: Architecture, settings: Settings) -> Estimate:
    key = (repr(architecture), settings)  # (an Architecture holds dicts: its repr is the key)
    if key not in _CACHE:
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest
        _CACHE[key] = estimate_step_bytes(architecture, settings)
    return _CACHE[key]


def card_words(budget_gib: float) -> str:
    if budget_gib == DEFAULT_BUDGET_GIB:
        return "8 GB"
    return f"{budget_gib:.3g} GiB"  # a GPU's free memory as 7.33 GiB, a whole budget as it is


def summary(estimate: Estimate, budget_gib: float = DEFAULT_BUDGET_GIB) -> str:
    """One line: "batch 8 fits in 8 GB at 768 px with checkpointing: about 6.7 GiB"."""
    s = estimate.settings
    size = f"{s.width} px" if s.width == s.height else f"{s.width}x{s.height} px"
    verb = "fits" if estimate.fits(int(budget_gib * GIB)) else "does not fit"
    lent = " and the text encoders lent" if s.text_encoders_lent else ""
    return (
        f"batch {s.batch} {verb} in {card_words(budget_gib)} at {size} {CHECKPOINTING_WORDS[s.checkpointing]}"
        f"{lent}: about {estimate.needed_gib:.1f} GiB (estimate)"
    )


def estimate_note(
    plan: MemoryPlan, backend, width: int, height: int, batch: int, num_vectors: int = 1
) -> str:
    """A sentence for an out-of-memory message: what the estimate said this step (the run's `plan`, at
    `width` x `height` px and `batch`) needs. Empty when the estimate cannot be made (the message about the
    failure matters more than the note)."""
    try:
        architecture = architecture_of_backend(backend)
        estimate = cached_estimate(architecture, settings_for_plan(plan, width, height, batch, num_vectors))
    except Exception:  # an estimate is advice: any failure in it must not hide the error being reported
        return ""
    return (
        f" The estimate for this step was about {estimate.needed_gib:.1f} GiB "
        f"(see `python -m ti_trainer estimate` for what fits)."
    )


def run_estimate_line(
    plan: MemoryPlan,
    backend,
    width: int,
    height: int,
    batch: int,
    num_vectors: int,
    budget_bytes: int | None,
) -> str:
    """The estimate for a run as it starts (its `plan` at `width` x `height` px and `batch`), for its
    messages: "Memory estimate: batch 8 fits in 7.3 GiB at 768 px with checkpointing: about 6.2 GiB
    (estimate)." against `budget_bytes` (what the GPU has for PyTorch; None: the 8 GB card). Empty when no
    estimate can be made: it is advice, and the run goes on without it."""
    try:
        architecture = architecture_of_backend(backend)
        estimate = cached_estimate(architecture, settings_for_plan(plan, width, height, batch, num_vectors))
    except Exception:  # advice only (see estimate_note)
        return ""
    budget_gib = budget_bytes / GIB if budget_bytes else DEFAULT_BUDGET_GIB
    return f"Memory estimate: {summary(estimate, budget_gib)}."


def first_fitting(
    candidates: list[MemoryPlan],
    backend,
    width: int,
    height: int,
    batch: int,
    num_vectors: int,
    budget_bytes: int,
) -> int | None:
    """The index of the first of `candidates` (least costly first) whose estimate fits `budget_bytes` (the
    last if none does) at `width` x `height` px and `batch`; None when no estimate can be made (then nothing
    is skipped). The GPU probes start there instead of at an out-of-memory error."""
    try:
        architecture = architecture_of_backend(backend)
        for index, plan in enumerate(candidates):
            settings = settings_for_plan(plan, width, height, batch, num_vectors)
            if cached_estimate(architecture, settings).fits(budget_bytes):
                return index
    except Exception:  # an estimate is advice: a failure in it must not stop the run the probes would check
        return None
    return len(candidates) - 1


def largest_estimated_batch(
    plan: MemoryPlan, backend, width: int, height: int, num_vectors: int, budget_bytes: int, limit: int
) -> int | None:
    """The largest batch the estimate says fits (None when no estimate can be made): where the fit finder's
    search starts."""
    from ti_trainer.vram.estimate import largest_batch

    try:
        settings = settings_for_plan(plan, width, height, 1, num_vectors)
        return largest_batch(architecture_of_backend(backend), settings, budget_bytes, limit)[0]
    except Exception:  # advice only, as above
        return None


def step_room_bytes(plan: MemoryPlan, latent_shape: tuple[int, ...], backend) -> int:
    """What a training step of `backend`'s model at `latent_shape` ([batch, channels, height, width]) needs on
    the GPU beyond its resident weights, under `plan`: the estimate's needed bytes (activations, the vectors'
    gradients, the allocator's and the kernels' allowances) less its weights. The room a host that places
    the weights itself (Forge's `load_models_gpu(..., memory_required=)`) is asked to keep free.

    Only for the released architectures the estimate knows by name (SD 1.x, 2.x, SDXL): a model of another
    width (the tests' tiny ones) raises ValueError, as any failure of the estimate raises: the caller has a
    fallback (backends/forge_loan.py)."""
    from ti_trainer.backends.contract import FAMILY_TEXT_WIDTHS

    family = backend.family
    if backend.text_width != FAMILY_TEXT_WIDTHS.get(family.name):
        raise ValueError(f"no named architecture of {family.title} has text width {backend.text_width}")
    batch, _, height, width = (int(size) for size in latent_shape)
    factor = family.vae_scale_factor
    settings = settings_for_plan(plan, width * factor, height * factor, batch)
    estimate = cached_estimate(architecture_of_backend(backend), settings)
    return estimate.needed_bytes - estimate.weights_bytes
