"""modules.sd_hijack_clip: the WebUI's text encoder wrapper (generation-time conditioning, a1111.md §3).

A prompt is emphasis-parsed, tokenized, cut into chunks of 75 tokens (BREAK starts a new one; with
`comma_padding_backtrack` the words after a nearby comma move to the next one; an embedding that does not fit
starts a new one), each chunk is wrapped as [start] + 75 + [end] padded with the end id, SD 2.x replaces what
follows the first end id with its pad id, embeddings are injected by EmbeddingsWithFixes, and the emphasis
multipliers are applied to the encoder's output. Chunks are concatenated along the token axis.

SDXL (sdxl.md §2): the wrappers stand in the conditioner's embedder list, so they carry what sgm's
GeneralConditioner reads (`is_trainable`, `input_key`, `return_pooled`, `legacy_ucg_val`); an encoder that
returns a pooled vector hangs it on its output as `.pooled`, emphasis leaves it alone, and only the first chunk's
is returned.
"""

import math
from collections import namedtuple

import torch

from modules import devices, prompt_parser
from modules.shared import opts

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


def apply_emphasis(z, multipliers):
    """The `emphasis` option: Original (also any unknown name) keeps the output's mean; No norm does not."""
    mode = opts.emphasis
    if mode in ("None", "Ignore"):
        return z
    weighted = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
    if mode == "No norm":
        return weighted
    return weighted * (z.mean() / weighted.mean())


class TextConditionalModel(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        self.return_pooled = getattr(wrapped, "return_pooled", False)
        self.legacy_ucg_val = None  # sgm's conditioner asks

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize_line(self, line):
        parsed = [[line, 1.0]] if opts.emphasis == "None" else prompt_parser.parse_prompt_attention(line)
        token_lists = self.tokenize([text for text, _ in parsed])
        chunks = []
        state = {"chunk": PromptChunk(), "count": 0, "last_comma": -1}

        def finish_chunk(is_last=False):
            chunk = state["chunk"]
            state["count"] += len(chunk.tokens) if is_last else self.chunk_length
            padding = self.chunk_length - len(chunk.tokens)
            if padding > 0:
                chunk.tokens += [self.id_end] * padding
                chunk.multipliers += [1.0] * padding
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            chunks.append(chunk)
            state["chunk"], state["last_comma"] = PromptChunk(), -1

        backtrack = opts.comma_padding_backtrack
        for tokens, (text, weight) in zip(token_lists, parsed):
            if text == "BREAK" and weight == -1:
                finish_chunk()
                continue
            position = 0
            while position < len(tokens):
                chunk = state["chunk"]
                if tokens[position] == self.comma_token:
                    state["last_comma"] = len(chunk.tokens)
                elif (
                    backtrack != 0
                    and len(chunk.tokens) == self.chunk_length
                    and state["last_comma"] != -1
                    and len(chunk.tokens) - state["last_comma"] <= backtrack
                ):
                    split_at = state["last_comma"] + 1
                    carried = chunk.tokens[split_at:], chunk.multipliers[split_at:]
                    del chunk.tokens[split_at:], chunk.multipliers[split_at:]
                    finish_chunk()
                    state["chunk"].tokens, state["chunk"].multipliers = list(carried[0]), list(carried[1])
                chunk = state["chunk"]
                if len(chunk.tokens) == self.chunk_length:
                    finish_chunk()
                    chunk = state["chunk"]

                embedding, name_length = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(tokens[position])
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                vector_count = int(embedding.vectors)
                if len(chunk.tokens) + vector_count > self.chunk_length:
                    finish_chunk()
                    chunk = state["chunk"]
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * vector_count
                chunk.multipliers += [weight] * vector_count
                position += name_length

        if state["chunk"].tokens or not chunks:
            finish_chunk(is_last=True)
        return chunks, state["count"]

    def process_texts(self, texts):
        known, batch_chunks, token_count = {}, [], 0
        for line in texts:
            if line not in known:
                known[line], count = self.tokenize_line(line)
                token_count = max(token_count, count)
            batch_chunks.append(known[line])
        return batch_chunks, token_count

    def forward(self, texts):
        batch_chunks, _ = self.process_texts(texts)
        used = {}
        outputs = []
        for index in range(max(len(chunks) for chunks in batch_chunks)):
            batch = [chunks[index] if index < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.hijack.fixes = [chunk.fixes for chunk in batch]
            for fixes in self.hijack.fixes:
                for _offset, embedding in fixes:
                    used[embedding.name] = embedding
            outputs.append(self.process_tokens([c.tokens for c in batch], [c.multipliers for c in batch]))
        if opts.textual_inversion_add_hashes_to_infotext and used:
            hashes = [
                f"{name.replace(':', '').replace(',', '')}: {emb.shorthash}"
                for name, emb in used.items()
                if emb.shorthash
            ]
            if hashes:
                # Appended to what an earlier encoder wrote: with SDXL's two, each name appears twice.
                earlier = self.hijack.extra_generation_params.get("TI hashes")
                self.hijack.extra_generation_params["TI hashes"] = ", ".join(
                    hashes + ([earlier] if earlier else [])
                )
        if self.return_pooled:
            return torch.hstack(outputs), outputs[0].pooled
        return torch.hstack(outputs)

    def process_tokens(self, batch_tokens, batch_multipliers):
        tokens = torch.asarray(batch_tokens).to(devices.device)
        if self.id_end != self.id_pad:
            for row, row_tokens in enumerate(batch_tokens):
                tokens[row, row_tokens.index(self.id_end) + 1 :] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        z = apply_emphasis(z, torch.asarray(batch_multipliers).to(devices.device))
        if pooled is not None:
            z.pooled = pooled
        return z


class FrozenCLIPEmbedderWithCustomWords(TextConditionalModel):
    """SD 1.x: the transformers CLIP text model; `CLIP_stop_at_last_layers` picks the layer."""

    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        self.comma_token = self.tokenizer.get_vocab().get(",</w>", None)
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=-skip)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state

    def encode_embedding_init_text(self, init_text, nvpt):
        layer = self.wrapped.transformer.text_model.embeddings.token_embedding.wrapped
        ids = self.tokenizer(init_text, max_length=nvpt, return_tensors="pt", add_special_tokens=False)
        return layer(ids["input_ids"].to(layer.weight.device)).squeeze(0)


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    """SDXL's CLIP-L: the hidden state its embedder is configured for (layer_idx, no final LayerNorm), or with
    the "Clip skip SDXL" setting the one `CLIP_stop_at_last_layers` picks, also without the LayerNorm."""

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(
            input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden"
        )
        if opts.sdxl_clip_l_skip is True:
            return outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]
