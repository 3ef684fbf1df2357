"""sgm.modules.encoders.modules: SDXL's conditioner and the embedders of sd_xl_base.yaml.

`GeneralConditioner.forward(batch, force_zero_embeddings)` runs each embedder on `batch[embedder.input_key]`
(under `torch.no_grad` unless the embedder `is_trainable`), sorts each output by its number of dimensions (3 ->
"crossattn", joined on the channel axis; 2 -> "vector", joined on dim 1) in embedder order, and zeroes the outputs
of embedders whose input key is in `force_zero_embeddings`.

The text embedders build the real networks: transformers' CLIPTextModel/CLIPTokenizer (`from_pretrained(version)`;
the tests give a local folder) and an open_clip model by architecture name (`pretrained=None` downloads nothing).
"""

import functools
from contextlib import nullcontext

import numpy as np
import open_clip
import torch
import torch.utils.checkpoint
from transformers import CLIPTextModel, CLIPTokenizer

from ...util import disabled_train, instantiate_from_config
from ..diffusionmodules.openaimodel import Timestep


def cuda_autocast(forward):
    """sgm runs the text embedders under CUDA autocast; on a machine without CUDA that does nothing."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with torch.autocast("cuda", enabled=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    return run


class AbstractEmbModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self._is_trainable = None
        self._ucg_rate = None
        self._input_key = None

    @property
    def is_trainable(self):
        return self._is_trainable

    @is_trainable.setter
    def is_trainable(self, value):
        self._is_trainable = value

    @property
    def ucg_rate(self):
        return self._ucg_rate

    @ucg_rate.setter
    def ucg_rate(self, value):
        self._ucg_rate = value

    @property
    def input_key(self):
        return self._input_key

    @input_key.setter
    def input_key(self, value):
        self._input_key = value


class GeneralConditioner(torch.nn.Module):
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models):
        super().__init__()
        embedders = []
        for config in emb_models:
            embedder = instantiate_from_config(config)
            if not isinstance(embedder, AbstractEmbModel):
                raise TypeError(
                    f"embedder model {type(embedder).__name__} has to inherit from AbstractEmbModel"
                )
            embedder.is_trainable = config.get("is_trainable", False)
            embedder.ucg_rate = config.get("ucg_rate", 0.0)
            if not embedder.is_trainable:
                embedder.train = disabled_train
                for param in embedder.parameters():
                    param.requires_grad = False
                embedder.eval()
            if "input_key" in config:
                embedder.input_key = config["input_key"]
            elif "input_keys" in config:
                embedder.input_keys = config["input_keys"]
            else:
                raise KeyError(
                    f"need either 'input_key' or 'input_keys' for embedder {type(embedder).__name__}"
                )
            embedder.legacy_ucg_val = config.get("legacy_ucg_value", None)
            if embedder.legacy_ucg_val is not None:
                embedder.ucg_prng = np.random.RandomState()
            embedders.append(embedder)
        self.embedders = torch.nn.ModuleList(embedders)

    def possibly_get_ucg_val(self, embedder, batch):
        for index in range(len(batch[embedder.input_key])):
            if embedder.ucg_prng.choice(2, p=[1 - embedder.ucg_rate, embedder.ucg_rate]):
                batch[embedder.input_key][index] = embedder.legacy_ucg_val
        return batch

    def forward(self, batch, force_zero_embeddings=None):
        force_zero_embeddings = force_zero_embeddings or []
        output = {}
        for embedder in self.embedders:
            # The trap for a trainer: a frozen embedder (all of SDXL's) runs without autograd.
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                if getattr(embedder, "input_key", None) is not None:
                    if embedder.legacy_ucg_val is not None:
                        batch = self.possibly_get_ucg_val(embedder, batch)
                    emb_out = embedder(batch[embedder.input_key])
                elif hasattr(embedder, "input_keys"):
                    emb_out = embedder(*[batch[key] for key in embedder.input_keys])
            if not isinstance(emb_out, (torch.Tensor, list, tuple)):
                raise TypeError(f"encoder outputs must be tensors or a sequence, but got {type(emb_out)}")
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0.0 and embedder.legacy_ucg_val is None:
                    keep = torch.bernoulli(
                        (1.0 - embedder.ucg_rate) * torch.ones(emb.shape[0], device=emb.device)
                    )
                    emb = keep.reshape((-1,) + (1,) * (emb.dim() - 1)) * emb
                if getattr(embedder, "input_key", None) in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                if out_key in output:
                    output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
                else:
                    output[out_key] = emb
        return output

    def get_unconditional_conditioning(self, batch_c, batch_uc=None, force_uc_zero_embeddings=None):
        rates = [embedder.ucg_rate for embedder in self.embedders]
        for embedder in self.embedders:
            embedder.ucg_rate = 0.0
        c = self(batch_c)
        uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings or [])
        for embedder, rate in zip(self.embedders, rates):
            embedder.ucg_rate = rate
        return c, uc


class FrozenCLIPEmbedder(AbstractEmbModel):
    """CLIP ViT-L/14's text model (transformers). SDXL: layer "hidden", layer_idx 11 = the output of block 11 of
    12, without the final LayerNorm; no pooled output."""

    LAYERS = ["last", "pooled", "hidden"]

    def __init__(
        self,
        version="openai/clip-vit-large-patch14",
        device="cuda",
        max_length=77,
        freeze=True,
        layer="last",
        layer_idx=None,
        always_return_pooled=False,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer {layer!r} is not one of {self.LAYERS}")
        self.tokenizer = CLIPTokenizer.from_pretrained(version)
        self.transformer = CLIPTextModel.from_pretrained(version)
        self.device = device
        self.max_length = max_length
        if freeze:
            self.freeze()
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = always_return_pooled
        if layer == "hidden" and (layer_idx is None or not 0 <= abs(layer_idx) <= 12):
            raise ValueError("layer 'hidden' needs a layer_idx within 12 of either end")

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    @cuda_autocast
    def forward(self, text):
        encoding = self.tokenizer(
            text,
            truncation=True,
            max_length=self.max_length,
            return_length=True,
            return_overflowing_tokens=False,
            padding="max_length",
            return_tensors="pt",
        )
        tokens = encoding["input_ids"].to(self.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        return (z, outputs.pooler_output) if self.return_pooled else z

    def encode(self, text):
        return self(text)


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """OpenCLIP ViT-bigG/14's text tower. With `legacy=False`, `encode_with_transformer` returns a dict:
    "penultimate" (the input of the last block, no ln_final), "last", and "pooled" (ln_final of the last layer
    at the end-of-text position, the highest id, times text_projection)."""

    LAYERS = ["pooled", "last", "penultimate"]

    def __init__(
        self,
        arch="ViT-H-14",
        version="laion2b_s32b_b79k",
        device="cuda",
        max_length=77,
        freeze=True,
        layer="last",
        always_return_pooled=False,
        legacy=True,
    ):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer {layer!r} is not one of {self.LAYERS}")
        model, _, _ = open_clip.create_model_and_transforms(
            arch, device=torch.device("cpu"), pretrained=version
        )
        del model.visual
        self.model = model
        self.device = device
        self.max_length = max_length
        self.return_pooled = always_return_pooled
        if freeze:
            self.freeze()
        self.layer = layer
        if layer == "last":
            self.layer_idx = 0
        elif layer == "penultimate":
            self.layer_idx = 1
        else:
            raise NotImplementedError(layer)
        self.legacy = legacy

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    @cuda_autocast
    def forward(self, text):
        z = self.encode_with_transformer(open_clip.tokenize(text).to(self.device))
        if not self.return_pooled and self.legacy:
            return z
        if self.return_pooled:
            if self.legacy:
                raise ValueError("a pooled output needs legacy=False")
            return z[self.layer], z["pooled"]
        return z[self.layer]

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        x = self.text_transformer_forward(x.permute(1, 0, 2), attn_mask=self.model.attn_mask)
        if self.legacy:
            return self.model.ln_final(x[self.layer])
        x["pooled"] = self.pool(self.model.ln_final(x["last"]), text)
        return x

    def pool(self, x, text):
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection

    def text_transformer_forward(self, x, attn_mask=None):
        """open_clip's blocks run sequence-first; both outputs are returned batch-first."""
        outputs = {}
        blocks = self.model.transformer.resblocks
        for index, block in enumerate(blocks):
            if index == len(blocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            if self.model.transformer.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask)
            else:
                x = block(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs

    def encode(self, text):
        return self(text)


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """Each number of a [B, d] input -> an `outdim`-wide sinusoidal embedding; the d embeddings are concatenated
    per row: [B, d * outdim]. SDXL feeds it (height, width) pairs in pixels."""

    def __init__(self, outdim):
        super().__init__()
        self.timestep = Timestep(outdim)
        self.outdim = outdim

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"expected [batch, dims], got {tuple(x.shape)}")
        batch, dims = x.shape
        return self.timestep(x.reshape(batch * dims)).reshape(batch, dims * self.outdim)
