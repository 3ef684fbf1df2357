"""sgm.modules.diffusionmodules.denoiser_weighting: the loss weight of a noise level."""


class EpsWeighting:
    def __call__(self, sigma):
        return sigma**-2.0
