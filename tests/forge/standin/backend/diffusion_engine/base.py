"""backend.diffusion_engine.base: what every Forge model class has (Forge: backend/diffusion_engine/base.py).

`ForgeObjects(unet, clip, vae, clipvision)` with `shallow_copy()`; `ForgeDiffusionEngine` holds `forge_objects`
(the set generation uses now), `forge_objects_original` (the base model's) and
`forge_objects_after_applying_lora`, and keeps A1111's names for compatibility: `cond_stage_model` and
`first_stage_model` are None, `is_sd1` / `is_sd2` / `is_sdxl` / `is_sd3` flags.
"""


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    matched_guesses = []

    def __init__(self, estimated_config, huggingface_components):
        self.model_config = estimated_config
        self.is_inpaint = estimated_config.inpaint_model()
        self.forge_objects = None
        self.forge_objects_original = None
        self.forge_objects_after_applying_lora = None
        self.current_lora_hash = str([])
        self.fix_for_webui_backward_compatibility()

    def set_clip_skip(self, clip_skip):
        pass

    def get_first_stage_encoding(self, x):
        return x

    def get_prompt_lengths_on_ui(self, prompt):
        return 0, 75

    def fix_for_webui_backward_compatibility(self):
        self.tiling_enabled = False
        self.first_stage_model = None
        self.cond_stage_model = None
        self.use_distilled_cfg_scale = False
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
