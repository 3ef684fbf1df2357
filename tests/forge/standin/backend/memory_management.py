"""backend.memory_management: which model parts sit on the GPU, as Forge decides it.

Written from Forge's backend/memory_management.py (dfdcbab6) in our own words, for a CPU-only machine (Forge's
`--always-cpu`: every load and offload device is the CPU, so nothing is ever partially loaded). What the
extension relies on is kept with Forge's meaning:

- `current_loaded_models`: `LoadedModel`s, most recently asked for first; equality is "wraps the same patcher".
- `load_models_gpu(patchers, memory_required=0, hard_memory_preservation=0)`: a patcher already loaded moves to
  the front; the others are loaded (`forge_patch_model` to the load device) and inserted at the front. Memory
  is freed first (`free_memory`) on every device other than the CPU, keeping at least
  `max(minimum_inference_memory(), memory_required) + hard_memory_preservation` free.
- `free_memory(memory_required, device, keep_loaded=[], free_all=False)`: unloads loaded models on `device`
  from the least recently used on, except those in `keep_loaded`, until enough is free (all of them with
  `--always-offload-from-vram`).
- `current_inference_memory`: the reserve the "GPU Weights" slider leaves for computation (bytes);
  `minimum_inference_memory()` reads it. `total_vram`: the device's memory in MB (the slider's maximum).
- `unload_all_models()`, `soft_empty_cache()`, `module_size()`, the device and dtype helpers.

Not here: CUDA/XPU/MPS/DirectML detection, partial loading (`build_module_profile`, manual casts), bitsandbytes
and GGUF, streams, pinned memory.
"""

import sys
from enum import Enum

import torch

from backend.args import args

cpu = torch.device("cpu")


class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


vram_state = VRAMState.DISABLED  # what --always-cpu gives
ALWAYS_VRAM_OFFLOAD = args.always_offload_from_vram
VAE_ALWAYS_TILED = False
OOM_EXCEPTION = torch.cuda.OutOfMemoryError
free_memory_bytes = 64 * 1024**3  # stand-in for the device's free memory (Forge asks the driver)
empty_cache_calls = 0  # test probe: how often soft_empty_cache ran

current_loaded_models = []
current_inference_memory = 1024 * 1024 * 1024
total_vram = free_memory_bytes / (1024 * 1024)  # MB, as Forge reads the device's total at start-up


def get_torch_device():
    return cpu


def text_encoder_device():
    return get_torch_device()


def text_encoder_offload_device():
    return cpu


def unet_offload_device():
    return cpu


def vae_device():
    return get_torch_device()


def vae_offload_device():
    return cpu


def intermediate_device():
    return cpu


def vae_dtype(device=None, allowed_dtypes=()):
    return torch.float32


def dtype_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def get_free_memory(dev=None, torch_free_too=False):
    return (free_memory_bytes, free_memory_bytes) if torch_free_too else free_memory_bytes


def module_size(module, exclude_device=None, include_device=None, return_split=False):
    total = 0
    for _, parameter in module.named_parameters():
        if exclude_device is not None and parameter.device == exclude_device:
            continue
        if include_device is not None and parameter.device != include_device:
            continue
        total += parameter.nelement() * parameter.element_size()
    return (total, total, 0) if return_split else total


class LoadedModel:
    def __init__(self, model):
        self.model = model  # a ModelPatcher
        self.device = model.load_device
        self.model_accelerated = False
        self.inclusive_memory = 0
        self.exclusive_memory = 0

    def compute_inclusive_exclusive_memory(self):
        self.inclusive_memory = module_size(self.model.model, include_device=self.device)
        self.exclusive_memory = module_size(self.model.model, exclude_device=self.device)

    def model_load(self, model_gpu_memory_when_using_cpu_swap=-1):
        self.real_model = self.model.forge_patch_model(self.device)
        self.model.current_device = self.model.load_device
        self.model.refresh_loras()
        return self.real_model

    def model_unload(self, avoid_model_moving=False):
        if avoid_model_moving:
            self.model.forge_unpatch_model()
        else:
            self.model.forge_unpatch_model(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def minimum_inference_memory():
    return current_inference_memory


def unload_model_clones(model):
    for index in reversed(range(len(current_loaded_models))):
        if model.is_clone(current_loaded_models[index].model):
            current_loaded_models.pop(index).model_unload(avoid_model_moving=True)


def free_memory(memory_required, device, keep_loaded=(), free_all=False):
    # Models nobody references any more (only this list and getrefcount's argument) are dropped first.
    for index in reversed(range(len(current_loaded_models))):
        if sys.getrefcount(current_loaded_models[index].model) <= 2:
            current_loaded_models.pop(index).model_unload(avoid_model_moving=True)
    if free_all:
        memory_required = 1e30
    offload_everything = ALWAYS_VRAM_OFFLOAD or vram_state == VRAMState.NO_VRAM
    unloaded = False
    for index in reversed(range(len(current_loaded_models))):
        if not offload_everything and get_free_memory(device) > memory_required:
            break
        candidate = current_loaded_models[index]
        if candidate.device == device and candidate not in keep_loaded:
            current_loaded_models.pop(index).model_unload()
            unloaded = True
    if unloaded:
        soft_empty_cache()


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    memory_to_free = max(minimum_inference_memory(), memory_required) + hard_memory_preservation
    to_load, already_loaded = [], []
    for patcher in models:
        loaded = LoadedModel(patcher)
        if loaded in current_loaded_models:
            index = current_loaded_models.index(loaded)
            current_loaded_models.insert(0, current_loaded_models.pop(index))
            already_loaded.append(current_loaded_models[0])
        else:
            to_load.append(loaded)
    if not to_load:
        for device in {loaded.device for loaded in already_loaded}:
            if device != cpu:
                free_memory(memory_to_free, device, already_loaded)
        return
    for loaded in to_load:
        unload_model_clones(loaded.model)
    required = {}
    for loaded in to_load:
        loaded.compute_inclusive_exclusive_memory()
        extra = loaded.exclusive_memory + loaded.inclusive_memory * 0.25
        required[loaded.device] = required.get(loaded.device, 0) + extra
    for device, needed in required.items():
        if device != cpu:
            free_memory(needed * 1.3 + memory_to_free, device, already_loaded)
    for loaded in to_load:
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def soft_empty_cache(force=False):
    global empty_cache_calls
    empty_cache_calls += 1


def unload_all_models():
    free_memory(1e30, get_torch_device(), free_all=True)
