"""backend.patcher.vae.VAE: the autoencoder with its patcher (Forge: backend/patcher/vae.py).

`encode(pixels NHWC in [0, 1])` loads the VAE through `load_models_gpu` (with `memory_used_encode`) and returns
unscaled latents, sampled from the posterior unless `model_options["model_vae_regulation"]` picks otherwise;
`decode(latents)` returns NHWC pixels in [0, 1]. Not here: tiled encode/decode, the OOM fallback, wrappers.
"""

import torch

from backend import memory_management
from backend.patcher.base import ModelPatcher


class VAE:
    def __init__(self, model=None, device=None, dtype=None, no_init=False):
        if no_init:
            return
        self.memory_used_encode = lambda shape, dtype: (
            1767 * shape[2] * shape[3] * memory_management.dtype_size(dtype)
        )
        self.memory_used_decode = lambda shape, dtype: (
            2178 * shape[2] * shape[3] * 64 * memory_management.dtype_size(dtype)
        )
        self.downscale_ratio = int(2 ** (len(model.config.down_block_types) - 1))
        self.latent_channels = int(model.config.latent_channels)
        self.first_stage_model = model.eval()
        self.device = device or memory_management.vae_device()
        self.vae_dtype = dtype or memory_management.vae_dtype()
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = memory_management.intermediate_device()
        self.patcher = ModelPatcher(
            self.first_stage_model,
            load_device=self.device,
            offload_device=memory_management.vae_offload_device(),
        )

    def encode(self, pixel_samples):
        regulation = self.patcher.model_options.get("model_vae_regulation", None)
        pixels = pixel_samples.movedim(-1, 1)
        memory_management.load_models_gpu(
            [self.patcher], memory_required=self.memory_used_encode(pixels.shape, self.vae_dtype)
        )
        pixels = (2.0 * pixels - 1.0).to(self.vae_dtype).to(self.device)
        return self.first_stage_model.encode(pixels, regulation).to(self.output_device).float()

    def decode(self, samples_in):
        memory_management.load_models_gpu(
            [self.patcher], memory_required=self.memory_used_decode(samples_in.shape, self.vae_dtype)
        )
        decoded = self.first_stage_model.decode(samples_in.to(self.vae_dtype).to(self.device))
        pixels = torch.clamp((decoded.to(self.output_device).float() + 1.0) / 2.0, min=0.0, max=1.0)
        return pixels.movedim(1, -1)
