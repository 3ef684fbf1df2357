"""backend.text_processing.classic_engine: prompt -> conditioning at generation time, for SD 1.x/2.x and each of
SDXL's encoders (Forge: backend/text_processing/classic_engine.py), in our own words, written independently of
ti_trainer/text/conditioning.py (the parity tests compare the two).

- The engine wraps the text model's `token_embedding` in `CLIPEmbeddingForTextualInversion`, which reads and
  clears `embeddings.fixes` and puts each fix's `embedding.vec` (or `vec[key]` for dict vectors) after the
  placeholder offset with `torch.cat`: a vec that requires grad receives gradient.
- `tokenize_line`: emphasis parsing, 75-token chunks with `[BOS] + 75 + [EOS]`, EOS padding, `BREAK`, a comma
  back-off of 20 tokens (hard-coded in Forge, not the setting), an embedding never split across chunks, its
  tokens written as placeholders 0 with a `PromptChunkFix(offset, embedding)`.
- `process_tokens`: when pad != EOS (SD 2.x) everything after the first EOS becomes pad; `encode_with_transformers`
  (position and token embeddings in fp32, `hidden_states[-max(clip_skip, minimal_clip_skip)]`, then
  `final_layer_norm` if set); emphasis from `opts.emphasis`, re-read at each call.
- SDXL's engines: with `return_pooled` the transformer's `pooler_output` (its final-norm output at the first end
  token), through the text model's `text_projection` when `text_projection` is set and the key is not
  clip_l, rides on z as `z.pooled`, kept aside from the emphasis; `__call__` then returns `(z, pooled of the
  first chunk)`.
- `__call__(texts)` encodes chunk by chunk and `hstack`s them; it prints the embeddings used and records them
  in `last_extra_generation_params["TI"]` (the infotext; each SDXL engine adds the names again).
"""

import math
from collections import namedtuple

import torch
from modules.shared import opts

from backend import memory_management
from backend.text_processing import emphasis, parsing
from backend.text_processing.textual_inversion import EmbeddingDatabase

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])
last_extra_generation_params = {}
COMMA_PADDING_BACKTRACK = 20


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        embeds = self.wrapped(input_ids)
        if not batch_fixes or not any(batch_fixes):
            return embeds
        rows = []
        for fixes, row in zip(batch_fixes, embeds):
            for offset, embedding in fixes:
                vec = (
                    embedding.vec[self.textual_inversion_key]
                    if isinstance(embedding.vec, dict)
                    else embedding.vec
                )
                vec = vec.to(embeds)
                length = min(row.shape[0] - offset - 1, vec.shape[0])
                row = torch.cat([row[: offset + 1], vec[:length], row[offset + 1 + length :]]).to(
                    dtype=embeds.dtype
                )
            rows.append(row)
        return torch.stack(rows)


class ClassicTextProcessingEngine:
    def __init__(
        self,
        text_encoder,
        tokenizer,
        chunk_length=75,
        embedding_dir=None,
        embedding_key="clip_l",
        embedding_expected_shape=768,
        emphasis_name="Original",
        text_projection=False,
        minimal_clip_skip=1,
        clip_skip=1,
        return_pooled=False,
        final_layer_norm=True,
    ):
        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        if isinstance(embedding_dir, str):
            self.embeddings.add_embedding_dir(embedding_dir)
            self.embeddings.load_textual_inversion_embeddings()
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        self.text_projection = text_projection
        self.minimal_clip_skip = minimal_clip_skip
        self.clip_skip = clip_skip
        self.return_pooled = return_pooled
        self.final_layer_norm = final_layer_norm
        self.chunk_length = chunk_length
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id
        embeddings = text_encoder.transformer.text_model.embeddings
        embeddings.token_embedding = CLIPEmbeddingForTextualInversion(
            embeddings.token_embedding, self.embeddings, textual_inversion_key=embedding_key
        )
        self.comma_token = tokenizer.get_vocab().get(",</w>", None)

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        chunk.multipliers = [1.0] * (self.chunk_length + 2)
        return chunk

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        device = memory_management.text_encoder_device()
        embeddings = self.text_encoder.transformer.text_model.embeddings
        embeddings.position_ids = embeddings.position_ids.to(device=device)
        embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
        embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
        outputs = self.text_encoder.transformer(tokens.to(device), output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = self.text_encoder.transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            pooled = outputs.pooler_output
            if self.text_projection and self.embedding_key != "clip_l":
                pooled = self.text_encoder.transformer.text_projection(pooled)
            z.pooled = pooled
        return z

    def tokenize_line(self, line):
        parsed = parsing.parse_prompt_attention(line, self.emphasis.name)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks, chunk = [], PromptChunk()
        token_count, last_comma = 0, -1

        def next_chunk(is_last=False):
            nonlocal chunk, token_count, last_comma
            token_count += len(chunk.tokens) if is_last else self.chunk_length
            missing = self.chunk_length - len(chunk.tokens)
            if missing > 0:
                chunk.tokens += [self.id_end] * missing
                chunk.multipliers += [1.0] * missing
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            chunks.append(chunk)
            chunk, last_comma = PromptChunk(), -1

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (
                    len(chunk.tokens) == self.chunk_length
                    and last_comma != -1
                    and len(chunk.tokens) - last_comma <= COMMA_PADDING_BACKTRACK
                ):
                    cut = last_comma + 1
                    moved_tokens, moved_multipliers = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    next_chunk()
                    chunk.tokens, chunk.multipliers = moved_tokens, moved_multipliers
                if len(chunk.tokens) == self.chunk_length:
                    next_chunk()
                embedding, length_in_tokens = self.embeddings.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                count = int(embedding.vectors)
                if len(chunk.tokens) + count > self.chunk_length:
                    next_chunk()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * count
                chunk.multipliers += [weight] * count
                position += length_in_tokens
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def process_texts(self, texts):
        cache, batch_chunks, token_count = {}, [], 0
        for line in texts:
            if line not in cache:
                cache[line], count = self.tokenize_line(line)
                token_count = max(token_count, count)
            batch_chunks.append(cache[line])
        return batch_chunks, token_count

    def __call__(self, texts):
        self.emphasis = emphasis.get_current_option(opts.emphasis)()
        batch_chunks, _ = self.process_texts(texts)
        used = {}
        zs = []
        for index in range(max(len(chunks) for chunks in batch_chunks)):
            batch = [chunks[index] if index < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            self.embeddings.fixes = [chunk.fixes for chunk in batch]
            for fixes in self.embeddings.fixes:
                for _, embedding in fixes:
                    used[embedding.name] = embedding
            zs.append(self.process_tokens([c.tokens for c in batch], [c.multipliers for c in batch]))
        if used:
            names = []
            for name in used:
                print(f"[Textual Inversion] Used Embedding [{name}] in CLIP of [{self.embedding_key}]")
                names.append(name.replace(":", "").replace(",", ""))
            previous = last_extra_generation_params.get("TI")
            last_extra_generation_params["TI"] = ", ".join(([previous] if previous else []) + names)
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, batch_tokens, batch_multipliers):
        tokens = torch.asarray(batch_tokens)
        if self.id_end != self.id_pad:
            for row, row_tokens in enumerate(batch_tokens):
                first_end = row_tokens.index(self.id_end)
                tokens[row, first_end + 1 :] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        self.emphasis.tokens = batch_tokens
        self.emphasis.multipliers = torch.asarray(batch_multipliers).to(z)
        self.emphasis.z = z
        self.emphasis.after_transformers()
        z = self.emphasis.z
        if pooled is not None:
            z.pooled = pooled
        return z
