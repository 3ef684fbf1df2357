"""sgm.modules.diffusionmodules.openaimodel: the SDXL UNet and `Timestep`.

The UNet is ldm's `UNetModel` (the real class the stand-in's SD 2.x model runs). sgm's differs only in what SDXL
needs from it here: `num_classes="sequential"` with `adm_in_channels`, a `label_emb` of
Sequential(Sequential(Linear, SiLU, Linear)) whose output is added to the time embedding (same parameter names
as sgm's, `label_emb.0.0.weight`), and arguments ldm lacks (`spatial_transformer_attn_type`: the WebUI patches
attention anyway). ldm's forward casts the input to `self.dtype`, which A1111's extend_sdxl sets to the
parameters' dtype, so it behaves as sgm's (which does not cast).
"""

import torch
from ldm.modules.diffusionmodules import openaimodel as ldm_openaimodel

from .util import timestep_embedding


class Timestep(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class UNetModel(ldm_openaimodel.UNetModel):
    def __init__(
        self,
        *args,
        num_classes=None,
        adm_in_channels=None,
        spatial_transformer_attn_type="softmax",
        **kwargs,
    ):
        if isinstance(kwargs.get("transformer_depth"), (list, tuple)) or "transformer_depth_middle" in kwargs:
            raise NotImplementedError("the stand-in UNet takes one transformer_depth for every level")
        sequential = num_classes == "sequential"
        super().__init__(*args, num_classes=None if sequential else num_classes, **kwargs)
        if sequential:
            if adm_in_channels is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels")
            time_embed_dim = self.model_channels * 4
            self.num_classes = num_classes
            self.label_emb = torch.nn.Sequential(
                torch.nn.Sequential(
                    torch.nn.Linear(adm_in_channels, time_embed_dim),
                    torch.nn.SiLU(),
                    torch.nn.Linear(time_embed_dim, time_embed_dim),
                )
            )
