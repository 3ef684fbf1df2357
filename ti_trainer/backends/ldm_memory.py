"""The memory plan (memory/plan.py) applied to the WebUI's ldm model, and the model given back exactly as found.

Everything here patches instances, never classes: the WebUI patches the classes itself (its attention
optimizations replace `CrossAttention.forward` and `AttnBlock.forward` class-wide), and an instance attribute
shadows those patches for the run and, once deleted, lets them show through again unchanged.

- Attention: `CrossAttention` / `MemoryEfficientCrossAttention` (UNet) and `AttnBlock` /
  `MemoryEfficientAttnBlock` (VAE) compute through memory.attention (SDPA, xformers or math), with fp32
  scores when asked. The WebUI's own training fallback ignores "upcast attention" (reference/a1111.md §2).
  `context_hook` lets the host keep what its attention does to the text (A1111 applies loaded
  hypernetworks there).
- Checkpointing: ldm's own `checkpoint` helper fails when no weight requires a gradient ("One of the
  differentiated Tensors does not require grad"), so its flags (`BasicTransformerBlock.checkpoint`,
  `ResBlock.use_checkpoint`) are switched off for the run, and the chosen blocks run through torch's
  non-reentrant checkpoint instead, which works on frozen weights.
- Placement (`TrainingPlacement`): under `--medvram` / `--lowvram`, A1111's modules/lowvram.py keeps one
  part of the model on the GPU at a time, moved by forward pre-hooks (`send_me_to_gpu`) and by wrappers around
  the VAE's encode/decode. Training runs the text encoder and the UNet every step, forward and backward, so
  those moves would happen twice a step (A1111 #12690: "days instead of minutes"). For the run the hooks and
  wrappers are taken out, the UNet and the text encoder sit on the GPU and the VAE waits in RAM; afterwards
  every hook, wrapper and tensor is put back where it was (CPU tensors are the very same storage, pinned or
  not, so nothing is copied back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint

from ti_trainer.memory.plan import MemoryPlan, attention, on_device, weights_in

_MISSING = object()
CROSS_ATTENTION = ("CrossAttention", "MemoryEfficientCrossAttention")
VAE_ATTENTION = ("AttnBlock", "MemoryEfficientAttnBlock")
# ldm block class -> the attribute that turns ldm's own checkpointing on (AttentionBlock always asks for it)
CHECKPOINT_FLAGS = {
    "BasicTransformerBlock": "checkpoint",
    "ResBlock": "use_checkpoint",
    "AttentionBlock": None,
}
LOWVRAM_SETUP = "setup_for_low_vram"
# The packages whose blocks these levers know: ldm (SD 1.x/2.x) and sgm (SDXL: the same block classes and
# attributes under its own package).
MODEL_PACKAGES = ("ldm.", "sgm.")
# Arguments sgm's CrossAttention takes beside ldm's, and the values with which they change nothing.
NEUTRAL_SGM_ARGUMENTS = {
    "additional_tokens": None,
    "n_times_crossframe_attn_in_self": 0,
}  # A1111's lowvram.py defines its hooks and wrappers inside this function

ContextHook = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _is_ldm(module: torch.nn.Module, names: tuple[str, ...] | dict) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith(MODEL_PACKAGES)


@contextlib.contextmanager
def instance_forwards(patches: list[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Give each module its own `forward` for a `with` block; afterwards it is the class's (or its own) again."""
    saved = [(module, vars(module).get("forward", _MISSING)) for module, _ in patches]
    try:
        for module, forward in patches:
            module.forward = forward
        yield
    finally:
        for module, original in reversed(saved):
            if original is _MISSING:
                vars(module).pop("forward", None)
            else:
                module.forward = original


# --- attention ---------------------------------------------------------------------------------------------


def _cross_attention_forward(module, kind: str, upcast: bool, context_hook: ContextHook | None):
    fallback = module.forward  # what the WebUI runs now (its class patch), for masks, which SD never passes

    def forward(x, context=None, mask=None, **kwargs):
        kwargs = {
            key: value
            for key, value in kwargs.items()
            if key not in NEUTRAL_SGM_ARGUMENTS or value != NEUTRAL_SGM_ARGUMENTS[key]
        }
        if mask is not None or kwargs:
            return fallback(x, context=context, mask=mask, **kwargs)
        context = x if context is None else context
        context_k, context_v = context_hook(context) if context_hook else (context, context)
        q, k, v = module.to_q(x), module.to_k(context_k), module.to_v(context_v)
        q, k, v = (t.unflatten(-1, (module.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, kind, upcast)
        return module.to_out(out.transpose(1, 2).flatten(2))

    return forward


def _vae_attention_forward(module, kind: str, upcast: bool):
    def forward(x):
        h = module.norm(x)
        q, k, v = module.q(h), module.k(h), module.v(h)
        batch, channels, height, width = q.shape
        # one head over every pixel: [batch, 1, pixels, channels]
        q, k, v = (t.reshape(batch, 1, channels, height * width).transpose(2, 3) for t in (q, k, v))
        out = attention(q, k, v, kind, upcast).transpose(2, 3).reshape(batch, channels, height, width)
        return x + module.proj_out(out)

    return forward


def attention_patches(
    model: torch.nn.Module, kind: str, upcast: bool, context_hook: ContextHook | None = None
):
    patches = []
    for module in model.modules():
        if _is_ldm(module, CROSS_ATTENTION):
            patches.append((module, _cross_attention_forward(module, kind, upcast, context_hook)))
        elif _is_ldm(module, VAE_ATTENTION):
            patches.append((module, _vae_attention_forward(module, kind, upcast)))
    return patches


def ldm_attention(model: torch.nn.Module, kind: str, upcast: bool, context_hook: ContextHook | None = None):
    """Attention in the UNet and the VAE through memory.attention for a `with` block."""
    return instance_forwards(attention_patches(model, kind, upcast, context_hook))


# --- gradient checkpointing ---------------------------------------------------------------------------------


def _contains(block: torch.nn.Module, class_name: str) -> bool:
    return any(type(layer).__name__ == class_name for layer in block)


def checkpointed_blocks(unet: torch.nn.Module, level: str) -> list[torch.nn.Module]:
    """ldm UNetModel blocks for a level: "high-res" is the input blocks before the first downsampling and
    the output blocks after the last upsampling, where activations are largest."""
    if level == "off":
        return []
    inputs, outputs = list(unet.input_blocks), list(unet.output_blocks)
    if level == "all":
        return [*inputs, unet.middle_block, *outputs]
    if level != "high-res":
        raise ValueError(f"unknown checkpointing level {level!r}")
    first_down = next(i for i, block in enumerate(inputs) if _contains(block, "Downsample"))
    last_up = max(i for i, block in enumerate(outputs) if _contains(block, "Upsample"))
    return [*inputs[:first_down], *outputs[last_up + 1 :]]


def _checkpointed(function: Callable) -> Callable:
    def forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    return forward


@contextlib.contextmanager
def ldm_checkpointing(unet: torch.nn.Module, level: str) -> Iterator[list[torch.nn.Module]]:
    """Checkpoint the ldm UNet blocks of `level` for a `with` block; yields the checkpointed modules."""
    chosen = {id(m) for block in checkpointed_blocks(unet, level) for m in block.modules()}
    flags, patches, checkpointed = [], [], []
    for module in unet.modules():
        if not _is_ldm(module, CHECKPOINT_FLAGS):
            continue
        flag = CHECKPOINT_FLAGS[type(module).__name__]
        if flag is not None and getattr(module, flag, False):
            flags.append((module, flag))
        if id(module) in chosen:
            inner = module.forward if flag else module._forward  # AttentionBlock.forward forces ldm's helper
            patches.append((module, _checkpointed(inner)))
            checkpointed.append(module)
        elif flag is None:
            patches.append((module, module._forward))
    try:
        for module, flag in flags:
            setattr(module, flag, False)
        with instance_forwards(patches):
            yield checkpointed
    finally:
        for module, flag in flags:
            setattr(module, flag, True)


@contextlib.contextmanager
def ldm_memory_levers(
    model: torch.nn.Module, plan: MemoryPlan, context_hook: ContextHook | None = None
) -> Iterator[None]:
    """Apply `plan` to an ldm `LatentDiffusion` for a `with` block, then undo every lever.

    Weights are converted only where they are not already in the plan's dtype (the WebUI keeps fp16), and
    come back bit for bit. Placement under --medvram/--lowvram is `TrainingPlacement`'s job.
    """
    with contextlib.ExitStack() as levers:
        levers.enter_context(ldm_attention(model, plan.attention, plan.upcast_attention, context_hook))
        levers.enter_context(ldm_checkpointing(model.model.diffusion_model, plan.checkpointing))
        if plan.weights_dtype is not None:
            levers.enter_context(weights_in(plan.weights_dtype, model.model, model.cond_stage_model))
        if plan.vae_offload:
            levers.enter_context(on_device(model.first_stage_model, "cpu"))
        yield


# --- placement under --medvram / --lowvram --------------------------------------------------------------------


def _from_lowvram(function) -> bool:
    return LOWVRAM_SETUP in getattr(function, "__qualname__", "")


def lowvram_hooks(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int, Callable]]:
    """A1111's placement hooks on `model` (forward pre-hooks installed by lowvram.setup_for_low_vram)."""
    return [
        (module, key, hook)
        for module in model.modules()
        for key, hook in module._forward_pre_hooks.items()
        if _from_lowvram(hook)
    ]


class TrainingPlacement:
    """Where the WebUI's model parts sit while training: UNet and text encoder on `device`, VAE on
    `vae_device`, A1111's --medvram/--lowvram hooks out of the way. A context manager; on exit everything is
    as it was when placement was last taken over.

    While it holds: `vae_on_device()` for encoding, `lent_to_host()` to give placement back to the WebUI for
    a moment (a preview through its txt2img, which expects its hooks).
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device | str, vae_device: torch.device | str = "cpu"
    ):
        self.model = model
        self.device, self.vae_device = torch.device(device), torch.device(vae_device)
        self._held: dict | None = None

    def __enter__(self) -> TrainingPlacement:
        self._take_over()
        return self

    def __exit__(self, *exc_info) -> None:
        self._hand_back()

    @property
    def parts_on_device(self) -> list[torch.nn.Module]:
        """What must sit on the GPU while training: the UNet, and the text encoder the gradient flows through."""
        return [self.model.model, self.model.cond_stage_model]

    def vae_on_device(self):
        return on_device(self.model.first_stage_model, self.device)

    @contextlib.contextmanager
    def lent_to_host(self) -> Iterator[None]:
        self._hand_back()
        try:
            yield
        finally:
            self._take_over()

    def _take_over(self) -> None:
        model, vae = self.model, self.model.first_stage_model
        hooks = lowvram_hooks(model)
        orders = {id(module): (module, list(module._forward_pre_hooks)) for module, _, _ in hooks}
        wrappers = [
            (name, vars(vae)[name]) for name in ("encode", "decode") if _from_lowvram(vars(vae).get(name))
        ]
        tensors = []
        for owner in model.modules():
            for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
                for name, tensor in table.items():
                    if tensor is not None:
                        # What sits in RAM is kept (the same storage, pinned or not) to be put back as is.
                        kept = (
                            None if tensor.device.type != "cpu" else tensor.data if is_parameter else tensor
                        )
                        tensors.append((owner, name, is_parameter, tensor.device, kept))
        self._held = {"hooks": hooks, "orders": orders, "wrappers": wrappers, "tensors": tensors}
        for module, key, _ in hooks:
            del module._forward_pre_hooks[key]
        for name, _ in wrappers:
            del vars(vae)[name]
        for part in self.parts_on_device:
            part.to(self.device)
        vae.to(self.vae_device)

    def _hand_back(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        for owner, name, is_parameter, device, kept in held["tensors"]:
            tensor = (owner._parameters if is_parameter else owner._buffers).get(name)
            if tensor is None:
                continue
            if kept is not None:  # back to the very storage it had (even after a round trip to the GPU)
                if tensor.device == kept.device and tensor.data_ptr() == kept.data_ptr():
                    continue
                value = kept
            elif tensor.device == device:
                continue
            else:
                value = tensor.data.to(device)
            if is_parameter:
                tensor.data = value
            else:
                owner._buffers[name] = value
        vae = self.model.first_stage_model
        for name, wrapper in held["wrappers"]:
            setattr(vae, name, wrapper)
        removed = {(id(module), key): hook for module, key, hook in held["hooks"]}
        for module, order in held["orders"].values():
            # The hooks in their original order; any added meanwhile (by someone else) after them.
            current = dict(module._forward_pre_hooks)
            module._forward_pre_hooks.clear()
            for key in order:
                hook = current.pop(key, None)
                hook = removed.get((id(module), key), hook)
                if hook is not None:
                    module._forward_pre_hooks[key] = hook
            module._forward_pre_hooks.update(current)
