"""backend.patcher.unet.UnetPatcher: the UNet's ModelPatcher; its `model` is a KModel (Forge:
backend/patcher/unet.py `from_model`, `clone`, `extra_preserved_memory_during_sampling`)."""

import copy

from backend.modules.k_model import KModel
from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, diffusers_scheduler, config, k_predictor=None):
        model = KModel(
            model=model, diffusers_scheduler=diffusers_scheduler, k_predictor=k_predictor, config=config
        )
        return UnetPatcher(
            model,
            load_device=model.diffusion_model.load_device,
            offload_device=model.diffusion_model.offload_device,
            current_device=model.diffusion_model.initial_device,
        )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        return n
