"""backend.diffusion_engine.sd15.StableDiffusion (Forge: backend/diffusion_engine/sd15.py), with SD 2.x's class
built on it (sd20.py; in Forge the two files repeat each other and differ in the text key and the flag).

Builds `CLIP` ({key: text encoder}), `VAE`, `UnetPatcher.from_model(unet, scheduler)`, and one
`ClassicTextProcessingEngine` (`text_processing_engine`) over the text encoder, loading `--embeddings-dir` once.
`get_learned_conditioning` loads the text encoder (`load_model_gpu(clip.patcher)`) and calls the engine;
`encode_first_stage` / `decode_first_stage` go through the VAE patcher; all three in inference mode.
"""

import torch

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


class StableDiffusion(ForgeDiffusionEngine):
    text_key = "clip_l"

    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        key = self.text_key
        clip = CLIP(
            model_dict={key: huggingface_components["text_encoder"]},
            tokenizer_dict={key: huggingface_components["tokenizer"]},
        )
        vae = VAE(model=huggingface_components["vae"])
        unet = UnetPatcher.from_model(
            model=huggingface_components["unet"],
            diffusers_scheduler=huggingface_components["scheduler"],
            config=estimated_config,
        )
        encoder = getattr(clip.cond_stage_model, key)
        self.text_processing_engine = ClassicTextProcessingEngine(
            text_encoder=encoder,
            tokenizer=getattr(clip.tokenizer, key),
            embedding_dir=dynamic_args["embedding_dir"],
            embedding_key=key,
            embedding_expected_shape=encoder.transformer.config.hidden_size,
            emphasis_name=dynamic_args["emphasis_name"],
            minimal_clip_skip=1,
            clip_skip=1,
            final_layer_norm=True,
        )
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sd1 = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.text_processing_engine(prompt)

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        _, token_count = self.text_processing_engine.process_texts([prompt])
        return token_count, self.text_processing_engine.get_target_prompt_token_count(token_count)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        return self.forge_objects.vae.first_stage_model.process_in(sample).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        sample = self.forge_objects.vae.first_stage_model.process_out(x)
        return (self.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0).to(x)
