"""backend.diffusion_engine.sdxl.StableDiffusionXL (Forge: backend/diffusion_engine/sdxl.py), in our own words.

Builds `CLIP` with two text encoders (`clip_l`, `clip_g`) and their tokenizers, `VAE`, the UNet's patcher, and
one `ClassicTextProcessingEngine` per encoder, each loading `--embeddings-dir` once with the SDXL embedding
width (Forge: 2048; here the tiny encoders' widths summed):

- `text_processing_engine_l` over clip_l: clip skip 2 (at least 2), no final norm, no pooled output;
- `text_processing_engine_g` over clip_g: clip skip 2 (at least 2), no final norm, the pooled output through
  `text_projection`.

`embedder` is `Timestep(256)`: each of the six size and crop numbers becomes 256 sinusoidal features.
`get_learned_conditioning(prompt)` (inference mode) loads the text encoders' patcher and returns
`{"crossattn": cat(cond_l, cond_g, dim=2), "vector": cat(pooled_g, flat, dim=1)}`, where flat embeds, in this
order, height, width, crop top, crop left, target height, target width: height and width are the prompt
object's (`SdConditioning.width`/`.height`; 1024 for a plain list or when unset), target = that size, crop =
the `sdxl_crop_top`/`sdxl_crop_left` settings. A negative prompt whose strings are all empty gives zeros for
cond_l, cond_g and the pooled part (not for the size part). `set_clip_skip` sets both engines' clip skip.
Not here: `StableDiffusionXLRefiner`, `save_checkpoint`.
"""

import torch
from modules.shared import opts

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.nn.unet import Timestep
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE
from backend.text_processing.classic_engine import ClassicTextProcessingEngine

SIZE_FEATURES = 256  # Forge's Timestep(256)


class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(
            model_dict={
                "clip_l": huggingface_components["text_encoder"],
                "clip_g": huggingface_components["text_encoder_2"],
            },
            tokenizer_dict={
                "clip_l": huggingface_components["tokenizer"],
                "clip_g": huggingface_components["tokenizer_2"],
            },
        )
        vae = VAE(model=huggingface_components["vae"])
        unet = UnetPatcher.from_model(
            model=huggingface_components["unet"],
            diffusers_scheduler=huggingface_components["scheduler"],
            config=estimated_config,
        )
        # Forge writes 2048 (768 + 1280); the tiny encoders' widths summed stand for it.
        width = sum(
            encoder.transformer.config.hidden_size
            for encoder in (clip.cond_stage_model.clip_l, clip.cond_stage_model.clip_g)
        )
        self.text_processing_engine_l = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_l,
            tokenizer=clip.tokenizer.clip_l,
            embedding_dir=dynamic_args["embedding_dir"],
            embedding_key="clip_l",
            embedding_expected_shape=width,
            emphasis_name=dynamic_args["emphasis_name"],
            text_projection=False,
            minimal_clip_skip=2,
            clip_skip=2,
            return_pooled=False,
            final_layer_norm=False,
        )
        self.text_processing_engine_g = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_g,
            tokenizer=clip.tokenizer.clip_g,
            embedding_dir=dynamic_args["embedding_dir"],
            embedding_key="clip_g",
            embedding_expected_shape=width,
            emphasis_name=dynamic_args["emphasis_name"],
            text_projection=True,
            minimal_clip_skip=2,
            clip_skip=2,
            return_pooled=True,
            final_layer_norm=False,
        )
        self.embedder = Timestep(SIZE_FEATURES)
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=vae, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sdxl = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, pooled = self.text_processing_engine_g(prompt)
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        numbers = [height, width, opts.sdxl_crop_top, opts.sdxl_crop_left, height, width]
        flat = torch.cat([self.embedder(torch.Tensor([number])) for number in numbers]).flatten()
        flat = flat.unsqueeze(dim=0).repeat(pooled.shape[0], 1).to(pooled)
        if getattr(prompt, "is_negative_prompt", False) and all(text == "" for text in prompt):
            pooled, cond_l, cond_g = (torch.zeros_like(t) for t in (pooled, cond_l, cond_g))
        return dict(crossattn=torch.cat([cond_l, cond_g], dim=2), vector=torch.cat([pooled, flat], dim=1))

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        _, token_count = self.text_processing_engine_l.process_texts([prompt])
        return token_count, self.text_processing_engine_l.get_target_prompt_token_count(token_count)

    @torch.inference_mode()
    def encode_first_stage(self, x):
        sample = self.forge_objects.vae.encode(x.movedim(1, -1) * 0.5 + 0.5)
        return self.forge_objects.vae.first_stage_model.process_in(sample).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        sample = self.forge_objects.vae.first_stage_model.process_out(x)
        return (self.forge_objects.vae.decode(sample).movedim(-1, 1) * 2.0 - 1.0).to(x)
