"""modules.sd_hijack: what the WebUI does to a model after loading it (a1111.md §3, §7).

The text encoder is wrapped (sd_hijack_clip / sd_hijack_open_clip), its token embedding becomes
EmbeddingsWithFixes (which puts registered embeddings' vectors at the positions the wrapper found), and the
attention optimization replaces ldm's CrossAttention.forward (A1111's default on torch 2: scaled-dot-product).

SDXL (sdxl.md §2): each text embedder inside sgm's conditioner is wrapped in place, found by its class name;
bigG's EmbeddingsWithFixes takes the `clip_g` part of an SDXL embedding, CLIP-L's the default `clip_l`. With two
text models, `cond_stage_model` is the conditioner itself. The stand-in's sgm UNet uses ldm's attention classes,
so the one optimization covers it.
"""

import ldm.modules.attention
import ldm.modules.encoders.modules
import torch
import torch.nn.functional as F

from modules import devices, sd_hijack_clip, sd_hijack_open_clip
from modules.shared import cmd_opts
from modules.textual_inversion.textual_inversion import EmbeddingDatabase

_original_cross_attention_forward = ldm.modules.attention.CrossAttention.forward


def scaled_dot_product_attention_forward(self, x, context=None, mask=None, **kwargs):
    batch = x.shape[0]
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    head_size = q.shape[-1] // self.heads

    def heads_first(t):
        return t.view(batch, -1, self.heads, head_size).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), dropout_p=0.0)
    out = out.transpose(1, 2).reshape(batch, -1, self.heads * head_size).to(q.dtype)
    return self.to_out(out)


def apply_optimizations():
    ldm.modules.attention.CrossAttention.forward = scaled_dot_product_attention_forward
    return "sdp"


def undo_optimizations():
    ldm.modules.attention.CrossAttention.forward = _original_cross_attention_forward


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(fixes) for fixes in batch_fixes) == 0:
            return inputs_embeds
        rows = []
        for fixes, row in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec
                vec = vec[self.textual_inversion_key] if isinstance(vec, dict) else vec
                vec = devices.cond_cast_unet(vec)
                count = min(row.shape[0] - offset - 1, vec.shape[0])
                row = torch.cat([row[: offset + 1], vec[:count], row[offset + 1 + count :]])
            rows.append(row)
        return torch.stack(rows)


class StableDiffusionModelHijack:
    fixes = None
    clip = None
    optimization_method = None

    def __init__(self):
        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(cmd_opts.embeddings_dir)

    def hijack_conditioner(self, m, conditioner):
        text_models = []
        for index, embedder in enumerate(conditioner.embedders):
            kind = type(embedder).__name__
            if kind == "FrozenOpenCLIPEmbedder":
                embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self)
                conditioner.embedders[index] = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(
                    embedder, self
                )
            elif kind == "FrozenCLIPEmbedder":
                embeddings = embedder.transformer.text_model.embeddings
                embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self)
                conditioner.embedders[index] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(
                    embedder, self
                )
            elif kind == "FrozenOpenCLIPEmbedder2":
                embedder.model.token_embedding = EmbeddingsWithFixes(
                    embedder.model.token_embedding, self, textual_inversion_key="clip_g"
                )
                conditioner.embedders[index] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(
                    embedder, self
                )
            else:
                continue
            text_models.append(conditioner.embedders[index])
        m.cond_stage_model = text_models[0] if len(text_models) == 1 else conditioner

    def undo_hijack_conditioner(self, m, conditioner):
        open_clip_wrappers = (
            sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords,
            sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords,
        )
        for index, embedder in enumerate(conditioner.embedders):
            if isinstance(embedder, open_clip_wrappers):
                embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                conditioner.embedders[index] = embedder.wrapped
            elif isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords):
                embeddings = embedder.wrapped.transformer.text_model.embeddings
                embeddings.token_embedding = embeddings.token_embedding.wrapped
                conditioner.embedders[index] = embedder.wrapped
        if hasattr(m, "cond_stage_model"):
            delattr(m, "cond_stage_model")

    def hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            self.hijack_conditioner(m, conditioner)
        encoder = m.cond_stage_model
        if isinstance(encoder, ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder):
            encoder.model.token_embedding = EmbeddingsWithFixes(encoder.model.token_embedding, self)
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(encoder, self)
        elif isinstance(encoder, ldm.modules.encoders.modules.FrozenCLIPEmbedder):
            embeddings = encoder.transformer.text_model.embeddings
            embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(encoder, self)
        self.optimization_method = apply_optimizations()
        self.clip = m.cond_stage_model

    def undo_hijack(self, m):
        conditioner = getattr(m, "conditioner", None)
        wrapper = getattr(m, "cond_stage_model", None)
        if conditioner:
            self.undo_hijack_conditioner(m, conditioner)
        elif isinstance(wrapper, sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords):
            wrapper.wrapped.model.token_embedding = wrapper.wrapped.model.token_embedding.wrapped
            m.cond_stage_model = wrapper.wrapped
        elif isinstance(wrapper, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords):
            embeddings = wrapper.wrapped.transformer.text_model.embeddings
            embeddings.token_embedding = embeddings.token_embedding.wrapped
            m.cond_stage_model = wrapper.wrapped
        undo_optimizations()
        self.clip = None

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
