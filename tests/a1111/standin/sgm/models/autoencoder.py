"""sgm.models.autoencoder.AutoencoderKLInferenceWrapper: the SDXL VAE. Its `encode` returns a sample of the
posterior (a tensor), not the distribution; the engine scales it (see diffusion.py). The network is ldm's
AutoencoderKL (same encoder/decoder, same parameter names)."""

from ldm.models.autoencoder import AutoencoderKL


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    def encode(self, x):
        return super().encode(x).sample()
