"""Training on Forge's loaded model through Forge's own memory management, and the model given back as found.

Forge (reference/forge.md §5) decides where every model part sits: `memory_management.load_models_gpu(patchers,
memory_required=...)` loads what a computation needs (partly, keeping some layers in RAM, when the "GPU
Weights" budget asks for it) and evicts what it must. So the trainer owns no placement: it asks Forge for the
UNet and the text encoder together, with room for the backward pass, and leaves Forge's budget
(`current_inference_memory`) and offload settings alone. After the run the loaded models are put back as they
were found (`restore_loaded`).

Two things stop autograd on Forge's model, and both are undone after the run:

- Forge loads checkpoints in `torch.inference_mode()`, so every weight is an *inference tensor*, which autograd
  refuses to save for the backward pass. `trainable_weights` puts an ordinary tensor over the very same storage
  in each such parameter and buffer (no copy: the model stays one model), and afterwards an inference tensor
  over the storage each one then has. The values never change; only the tensors' kind does.
- Forge's transformer block adds its residuals in place (`x += n`) after a LayerNorm has saved that `x` for the
  backward pass. `in_place_safe` gives those LayerNorms a copy of their input, so the add no longer modifies a
  saved tensor (the copy is what the norm saves anyway, so it costs no extra memory to speak of).

`memory_management` is Forge's `backend.memory_management` module, handed in by the host (host/forge.py):
nothing here imports Forge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.utils.checkpoint

from ti_trainer.backends.ldm_memory import checkpointed_blocks, instance_forwards

TRANSFORMER_BLOCK = "BasicTransformerBlock"  # Forge's backend/nn/unet.py, with its in-place residual adds
# How many times Forge's own estimate of one forward's activations (`KModel.memory_required`) a training step
# keeps for its backward pass: every block's activations without checkpointing, fewer with it. Rough figures:
# Forge's estimate is itself a rule of thumb (1.28 x area x 16384 bytes per element size).
BACKWARD_FACTOR = {"off": 3.0, "high-res": 2.0, "all": 1.5}


# --- the loaded models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedState:
    """What Forge had loaded, most recently used first, and the reserve its GPU-weights budget keeps free."""

    patchers: tuple
    inference_memory: int


def loaded_state(memory_management: ModuleType) -> LoadedState:
    return LoadedState(
        tuple(loaded.model for loaded in memory_management.current_loaded_models),
        int(memory_management.current_inference_memory),
    )


def restore_loaded(memory_management: ModuleType, found: LoadedState) -> None:
    """Unload what the run loaded, load again what it displaced, in the order Forge had them.

    Forge's own calls do it: `free_memory` with the found models kept (it unloads the rest, on each device),
    then `load_models_gpu` over the found models in reverse, which moves each one to the front in turn.
    """
    kept = [loaded for loaded in memory_management.current_loaded_models if loaded.model in found.patchers]
    devices = {loaded.device for loaded in memory_management.current_loaded_models}
    for device in devices:
        memory_management.free_memory(1e30, device, keep_loaded=kept)
    if found.patchers:
        memory_management.load_models_gpu(list(reversed(found.patchers)))
    memory_management.current_inference_memory = found.inference_memory


# --- inference tensors -----------------------------------------------------------------------------------------


def _over_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of the current mode's kind (inference or ordinary) over `tensor`'s storage: no copy."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


Path = tuple[int, str]  # (id of the owning module, the parameter's or buffer's name)


def _tensors(modules: list[torch.nn.Module]) -> Iterator[tuple[Path, dict, bool, torch.Tensor]]:
    """Every parameter and buffer of `modules`: (its path, the table holding it, is it a parameter, it)."""
    for module in modules:
        for owner in module.modules():
            for table, is_parameter in ((owner._parameters, True), (owner._buffers, False)):
                for name, tensor in list(table.items()):
                    if tensor is not None:
                        yield (id(owner), name), table, is_parameter, tensor


class TrainableWeights:
    """Forge's inference-tensor weights as ordinary tensors over the same storage, while the block runs.

    `refresh()` converts again what Forge has meanwhile re-created in inference mode (a load or a preview moves
    weights under inference mode). On exit every tensor that was an inference tensor is one again, over the
    storage it has then (the same, unless Forge moved it meanwhile), with the same values and requires_grad.
    While the block runs the converted parameters are frozen (requires_grad False).
    """

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self._requires_grad: dict[Path, bool] = {}  # the tensors that were inference tensors, and their flag

    def __enter__(self) -> TrainableWeights:
        self.refresh()
        return self

    def refresh(self) -> int:
        """Convert the inference tensors there are now; returns how many."""
        with torch.inference_mode(False):
            return self._swap(lambda path, tensor: tensor.is_inference(), record=True)

    def __exit__(self, *exc_info) -> None:
        with torch.inference_mode():
            self._swap(lambda path, tensor: path in self._requires_grad and not tensor.is_inference())

    def _swap(self, wanted: Callable[[Path, torch.Tensor], bool], record: bool = False) -> int:
        """Replace each tensor `wanted` picks by one of the current mode's kind over the same storage; a
        parameter two modules share stays shared."""
        replaced: dict[int, torch.Tensor] = {}
        for path, table, is_parameter, tensor in _tensors(self.modules):
            if not wanted(path, tensor):
                continue
            if record:
                self._requires_grad.setdefault(path, tensor.requires_grad)
            new = replaced.get(id(tensor))
            if new is None:
                new = _over_storage(tensor)
                if is_parameter:  # frozen while training; given back with the flag it was found with
                    flag = False if record else self._requires_grad[path]
                    new = torch.nn.Parameter(new, requires_grad=flag)
                replaced[id(tensor)] = new
            table[path[1]] = new
        return len(replaced)


# --- in-place residual adds ------------------------------------------------------------------------------------


def _copying_input(norm: torch.nn.Module) -> Callable:
    forward = norm.forward

    def copy_then_normalise(x):
        return forward(x.clone() if x.requires_grad else x)

    return copy_then_normalise


def in_place_safe(unet: torch.nn.Module) -> contextlib.AbstractContextManager:
    """For a `with` block: the LayerNorms inside Forge's transformer blocks normalise a copy of their input, so
    the block's in-place residual add does not modify the tensor the norm saved for the backward pass."""
    patches = [
        (norm, _copying_input(norm))
        for block in unet.modules()
        if type(block).__name__ == TRANSFORMER_BLOCK
        for norm in block.modules()
        if isinstance(norm, torch.nn.LayerNorm)
    ]
    return instance_forwards(patches)


# --- gradient checkpointing ------------------------------------------------------------------------------------


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def forge_checkpointing(unet: torch.nn.Module, level: str) -> Iterator[list[torch.nn.Module]]:
    """Checkpoint Forge's UNet blocks of `level` for a `with` block (Forge's own `checkpoint` helper raises:
    it has none); its UNet has ldm's layout, so the blocks are chosen as for ldm's. Yields them."""
    blocks = checkpointed_blocks(unet, level)
    with instance_forwards([(block, _checkpointed(block.forward)) for block in blocks]):
        yield blocks


def backward_bytes(forward_estimate: float, checkpointing: str) -> int:
    """The memory a training step needs beyond the weights, from Forge's estimate of one forward's: the
    fallback where the VRAM estimate (the loan's `step_memory`) cannot be made. It falls short: 2 to 5 times
    below the estimate without checkpointing, 1.0 to 1.7 with every block checkpointed (docs/benchmarks.md)."""
    return int(forward_estimate * BACKWARD_FACTOR[checkpointing])


# --- Forge's own levers, in words ------------------------------------------------------------------------------

MIB = 1024 * 1024
_DTYPE_WORDS = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    getattr(torch, "float8_e4m3fn", None): "fp8 (e4m3fn)",
    getattr(torch, "float8_e5m2", None): "fp8 (e5m2)",
}
# What Forge's VRAM states (its --always-*-vram flags; normal otherwise) mean for where weights sit.
_VRAM_STATE_WORDS = {
    "DISABLED": "everything on the CPU",
    "NO_VRAM": "every weight in RAM, copied to the GPU as each layer computes",
    "HIGH_VRAM": "every model kept on the GPU",
    "SHARED": "models in memory the GPU shares with the CPU",
}


def dtype_words(dtype) -> str:
    """A dtype as the plan's words name it ("fp16"); Forge's low-bit storages ("nf4", "gguf") as they are."""
    return _DTYPE_WORDS.get(dtype) or str(dtype).removeprefix("torch.")


def forge_memory_in_words(memory_management: ModuleType, storage_dtype) -> str:
    """Forge's part of a run's memory, as its settings stand: the dtype the UNet's weights are stored in, and
    where its memory manager puts the weights ("GPU Weights" slider, VRAM state, offload flag). Read with
    defaults: a Forge without one of these members still gets its line."""
    parts = [f"UNet weights in {dtype_words(storage_dtype)}"]
    state = getattr(getattr(memory_management, "vram_state", None), "name", "NORMAL_VRAM")
    if state in _VRAM_STATE_WORDS:
        parts.append(_VRAM_STATE_WORDS[state])
    else:  # normal or low VRAM: the "GPU Weights" budget decides what stays in RAM
        reserve = int(getattr(memory_management, "current_inference_memory", 0)) / MIB
        total = getattr(memory_management, "total_vram", None)
        budget = f"GPU Weights {total - reserve:.0f} of {total:.0f} MB" if total else ""
        budget = budget or f"{reserve:.0f} MB kept free for computing"
        parts.append(
            budget + " (weights beyond it wait in RAM and are copied to the GPU as each layer computes)"
        )
    if getattr(memory_management, "ALWAYS_VRAM_OFFLOAD", False):
        parts.append("other models unloaded whenever one loads")
    return ", ".join(parts)
