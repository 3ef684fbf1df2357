"""sgm.models.diffusion.DiffusionEngine: SDXL's model object.

`model` is the UNet inside OpenAIWrapper, `denoiser` sgm's sampling wrapper, `conditioner` the
GeneralConditioner, `first_stage_model` the VAE (frozen, eval). `encode_first_stage` multiplies by
`scale_factor` and `decode_first_stage` divides, both without autograd. `forward(x, batch)` is the training
loss, which needs a `loss_fn_config` (the inference yaml has none, so it fails there).
"""

import pytorch_lightning as pl
import torch

from ..modules import UNCONDITIONAL_CONFIG
from ..modules.diffusionmodules.wrappers import OPENAIUNETWRAPPER
from ..util import default, disabled_train, get_obj_from_str, instantiate_from_config


class DiffusionEngine(pl.LightningModule):
    def __init__(
        self,
        network_config,
        denoiser_config,
        first_stage_config,
        conditioner_config=None,
        sampler_config=None,
        optimizer_config=None,
        scheduler_config=None,
        loss_fn_config=None,
        network_wrapper=None,
        ckpt_path=None,
        use_ema=False,
        ema_decay_rate=0.9999,
        scale_factor=1.0,
        disable_first_stage_autocast=False,
        input_key="jpg",
        log_keys=None,
        no_cond_log=False,
        compile_model=False,
    ):
        super().__init__()
        if use_ema or ckpt_path is not None:
            raise NotImplementedError("the stand-in engine has no EMA and loads no checkpoint")
        self.log_keys = log_keys
        self.input_key = input_key
        self.optimizer_config = default(optimizer_config, {"target": "torch.optim.AdamW"})
        network = instantiate_from_config(network_config)
        self.model = get_obj_from_str(default(network_wrapper, OPENAIUNETWRAPPER))(
            network, compile_model=compile_model
        )
        self.denoiser = instantiate_from_config(denoiser_config)
        self.sampler = instantiate_from_config(sampler_config) if sampler_config is not None else None
        self.conditioner = instantiate_from_config(default(conditioner_config, UNCONDITIONAL_CONFIG))
        self.scheduler_config = scheduler_config
        self._init_first_stage(first_stage_config)
        self.loss_fn = instantiate_from_config(loss_fn_config) if loss_fn_config is not None else None
        self.use_ema = use_ema
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.no_cond_log = no_cond_log

    def _init_first_stage(self, config):
        model = instantiate_from_config(config).eval()
        model.train = disabled_train
        for param in model.parameters():
            param.requires_grad = False
        self.first_stage_model = model

    def get_input(self, batch):
        return batch[self.input_key]

    def _first_stage_autocast(self):
        return torch.autocast(
            "cuda", enabled=not self.disable_first_stage_autocast and torch.cuda.is_available()
        )

    @torch.no_grad()
    def decode_first_stage(self, z):
        z = z / self.scale_factor
        with self._first_stage_autocast():
            return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        with self._first_stage_autocast():
            z = self.first_stage_model.encode(x)
        return self.scale_factor * z

    def forward(self, x, batch):
        loss = self.loss_fn(self.model, self.denoiser, self.conditioner, x, batch)
        loss_mean = loss.mean()
        return loss_mean, {"loss": loss_mean}
