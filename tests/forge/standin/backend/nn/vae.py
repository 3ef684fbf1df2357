"""backend.nn.vae.IntegratedAutoencoderKL: the SD autoencoder with Forge's interface (Forge: backend/nn/vae.py).

Forge writes its own ldm-style encoder and decoder under diffusers' config names; the stand-in takes diffusers'
`AutoencoderKL` networks and gives them Forge's methods: `encode(x in [-1, 1], regulation=None)` returns a
posterior sample (or `regulation(posterior)`), `decode(z)`, `process_in(z) = (z - shift_factor) *
scaling_factor`, `process_out`.
"""

from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


class IntegratedAutoencoderKL(AutoencoderKL):
    @property
    def scaling_factor(self):
        return self.config.scaling_factor

    @property
    def shift_factor(self):
        return getattr(self.config, "shift_factor", None) or 0.0

    def encode(self, x, regulation=None):
        moments = self.quant_conv(self.encoder(x))
        posterior = DiagonalGaussianDistribution(moments)
        return posterior.sample() if regulation is None else regulation(posterior)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scaling_factor

    def process_out(self, latent):
        return latent / self.scaling_factor + self.shift_factor
