"""backend.modules.k_prediction: the noise schedule as k-diffusion sigmas (Forge: backend/modules/k_prediction.py).

`Prediction` from a diffusers scheduler config (only "scaled_linear" with "epsilon" / "v_prediction"):
float64 betas, `alphas_cumprod`, `sigmas`, `log_sigmas` stored as float32 buffers; `timestep(sigma)` is the
nearest discrete step; `calculate_input` scales x by 1/sqrt(sigma^2 + sigma_data^2); `calculate_denoised`
turns the UNet's raw output (eps or v) into x0. Not here: EDM, flow and "const" predictions, sigma rescaling.
"""

import torch


def make_beta_schedule(n_timestep, linear_start, linear_end):
    return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2


class Prediction(torch.nn.Module):
    def __init__(
        self,
        sigma_data=1.0,
        prediction_type="epsilon",
        linear_start=0.00085,
        linear_end=0.012,
        timesteps=1000,
    ):
        super().__init__()
        assert prediction_type in ("epsilon", "v_prediction")
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type
        alphas_cumprod = torch.cumprod(1.0 - make_beta_schedule(timesteps, linear_start, linear_end), dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        distances = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep):
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma**2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction_type == "v_prediction":
            scale = sigma**2 + self.sigma_data**2
            return (
                model_input * self.sigma_data**2 / scale - model_output * sigma * self.sigma_data / scale**0.5
            )
        return model_input - model_output * sigma


def k_prediction_from_diffusers_scheduler(scheduler):
    config = scheduler.config
    if (
        getattr(config, "prediction_type", None) in ("epsilon", "v_prediction")
        and config.beta_schedule == "scaled_linear"
    ):
        return Prediction(
            prediction_type=config.prediction_type,
            linear_start=config.beta_start,
            linear_end=config.beta_end,
            timesteps=config.num_train_timesteps,
        )
    raise NotImplementedError(f"Failed to recognize {scheduler}")
