"""backend.nn.unet.IntegratedUNet2DConditionModel: the ldm-layout UNet Forge runs for SD 1.x/2.x (Forge:
backend/nn/unet.py), in our own words and reduced to what SD 1.x/2.x use.

Kept as Forge has it: the module names and key layout (`time_embed`, `input_blocks`, `middle_block`,
`output_blocks`, `out`; `TimestepEmbedSequential`, `ResBlock`, `SpatialTransformer`, `BasicTransformerBlock`,
`Downsample`, `Upsample`), `forward(x, timesteps, context, y=None, control=None, transformer_options={})`, the
transformer block's in-place residual adds (`x += n` after attn1 and attn2, which autograd refuses once a norm
has saved `x` for the backward), and `checkpoint(...)` that raises when asked for (Forge has no gradient
checkpointing), and SDXL's label embedding: with `num_classes="sequential"` a `label_emb` (Linear-SiLU-Linear,
nested as Forge nests it) takes the `adm_in_channels`-wide vector `y` and is added to the time embedding.
`Timestep(dim)` is the sinusoidal embedder SDXL's engine builds its size and crop conditioning with. Not here:
integer and "continuous" classes, per-level transformer depths, ControlNet, block modifiers and attention
patches.
"""

# ruff: noqa: B006  (Forge's signatures take `transformer_options={}`, and its UNet writes into it: kept as is)

import math

import torch
import torch.nn.functional as F
from torch import nn


def checkpoint(function, args, parameters, enable=False):
    if enable:
        raise NotImplementedError("Gradient Checkpointing is not implemented.")
    return function(*args)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def attention_function(q, k, v, heads, mask=None):
    batch, _, inner = q.shape
    q, k, v = (t.view(batch, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, inner)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None, value=None, mask=None, transformer_options={}):
        context = x if context is None else context
        q, k = self.to_q(x), self.to_k(context)
        v = self.to_v(context if value is None else value)
        return self.to_out(attention_function(q, k, v, self.heads, mask))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim=None, checkpoint=True):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.checkpoint = checkpoint
        self.n_heads, self.d_head = n_heads, d_head

    def forward(self, x, context=None, transformer_options={}):
        return checkpoint(self._forward, (x, context, transformer_options), None, self.checkpoint)

    def _forward(self, x, context=None, transformer_options={}):
        n = self.norm1(x)
        n = self.attn1(n, transformer_options=transformer_options)
        x += n  # in place, as in Forge: norm1 saved the x it was given
        n = self.norm2(x)
        n = self.attn2(n, context=context, transformer_options=transformer_options)
        x += n
        skip = x
        x = self.ff(self.norm3(x))
        x += skip
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, context_dim=None, use_linear=True, use_checkpoint=False):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner, n_heads, d_head, context_dim=context_dim, checkpoint=use_checkpoint
                )
            ]
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)
        self.use_linear = use_linear

    def forward(self, x, context=None, transformer_options={}):
        batch, channels, height, width = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for index, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = index
            x = block(x, context=context, transformer_options=transformer_options)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepBlock(nn.Module):
    pass


class Timestep(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return timestep_embedding(t, self.dim)


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb, transformer_options)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, output_shape=None):
        size = output_shape[2:4] if output_shape is not None else None
        x = F.interpolate(x, size=size, scale_factor=None if size is not None else 2.0, mode="nearest")
        return self.conv(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x, emb, transformer_options={}):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class IntegratedUNet2DConditionModel(nn.Module):
    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        channel_mult=(1, 2, 4, 4),
        num_head_channels=64,
        context_dim=None,
        use_linear_in_transformer=True,
        use_checkpoint=False,
        num_classes=None,
        adm_in_channels=None,
    ):
        super().__init__()
        self.in_channels, self.model_channels, self.out_channels = in_channels, model_channels, out_channels
        self.num_classes = num_classes
        time_width = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_width), nn.SiLU(), nn.Linear(time_width, time_width)
        )
        if num_classes is not None:
            if num_classes != "sequential":
                raise ValueError("Bad ADM")  # the stand-in has SDXL's kind only
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_width), nn.SiLU(), nn.Linear(time_width, time_width)
                )
            )

        def transformer(channels):
            heads = channels // num_head_channels
            return SpatialTransformer(
                channels, heads, num_head_channels, context_dim, use_linear_in_transformer, use_checkpoint
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels, channels = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(
                    TimestepEmbedSequential(
                        ResBlock(channels, time_width, mult * model_channels),
                        transformer(mult * model_channels),
                    )
                )
                channels = mult * model_channels
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(channels, time_width), transformer(channels), ResBlock(channels, time_width)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for index in range(num_res_blocks + 1):
                layers = [ResBlock(channels + skip_channels.pop(), time_width, mult * model_channels)]
                channels = mult * model_channels
                layers.append(transformer(channels))
                if level and index == num_res_blocks:
                    layers.append(Upsample(channels))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )

    def forward(
        self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs
    ):
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        assert (y is not None) == (self.num_classes is not None)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = module(h, emb, context, transformer_options)
            hs.append(h)
        transformer_options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options)
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            h = torch.cat([h, hs.pop()], dim=1)
            output_shape = hs[-1].shape if hs else None
            h = module(h, emb, context, transformer_options, output_shape)
        transformer_options["block"] = ("last", 0)
        return self.out(h.type(x.dtype))
