"""sgm.modules.attention. The stand-in's UNet is ldm's, so its attention classes are ldm's: a WebUI
optimization that replaces `sgm.modules.attention.CrossAttention.forward` reaches the layers the UNet runs."""

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer

__all__ = ["BasicTransformerBlock", "CrossAttention", "SpatialTransformer"]
