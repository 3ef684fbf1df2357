"""backend.patcher.base.ModelPatcher: a model with its devices and patches, as the memory manager loads it.

From Forge's backend/patcher/base.py (dfdcbab6), in our own words: `model`, `load_device`, `offload_device`,
`current_device`, `size` (`model_size()`), `model_options` (with "transformer_options"), `clone()` (same model,
copied options), `is_clone(other)` (same model), `forge_patch_model(device)` / `forge_unpatch_model(device)`
(object patches applied and taken off, the model moved), `refresh_loras()`, `memory_required(shape)`.
Not here: LoRA (`add_patches` records nothing; `refresh_loras` has nothing to merge), the attention and
block patch setters beyond `model_options` itself.
"""

import copy

from backend import memory_management, utils


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.model_size()
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = offload_device if current_device is None else current_device

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = memory_management.module_size(self.model)
        return self.size

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def refresh_loras(self):
        pass  # no LoRA in the stand-in: Forge merges self.lora_patches into the weights here

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    def forge_patch_model(self, target_device=None):
        for key, item in self.object_patches.items():
            self.object_patches_backup.setdefault(key, utils.get_attr(self.model, key))
            utils.set_attr_raw(self.model, key, item)
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
        return self.model

    def forge_unpatch_model(self, target_device=None):
        if target_device is not None:
            self.model.to(target_device)
            self.current_device = target_device
        for key, item in self.object_patches_backup.items():
            utils.set_attr_raw(self.model, key, item)
        self.object_patches_backup = {}
