"""sgm.modules.diffusionmodules.wrappers: the engine's `model`, which unpacks the conditioning dict for the UNet."""

import torch

OPENAIUNETWRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


class IdentityWrapper(torch.nn.Module):
    def __init__(self, diffusion_model, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = torch.compile(diffusion_model) if compile_model else diffusion_model

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    def forward(self, x, t, c, **kwargs):
        # "concat" (inpainting) joins the latent on the channel axis; crossattn -> context, vector -> y.
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)
