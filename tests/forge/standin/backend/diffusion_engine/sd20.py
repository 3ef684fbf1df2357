"""backend.diffusion_engine.sd20.StableDiffusion2 (Forge: backend/diffusion_engine/sd20.py): text encoder
"clip_h" (expected embedding width 1024 in Forge; the tiny model's own width here), clip skip 1 = the HF
model's last layer + final norm (Forge's SD 2.x text model has 23 layers), all generation-time methods in
inference mode."""

from backend.diffusion_engine.sd15 import StableDiffusion


class StableDiffusion2(StableDiffusion):
    text_key = "clip_h"

    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        self.is_sd1, self.is_sd2 = False, True
