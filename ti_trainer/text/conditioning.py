"""Prompt -> conditioning with A1111's rules, and the trainable vectors injected where the name appears.

What the WebUI does at generation time (reference/a1111.md §3), reproduced over any CLIP-style text encoder:
prompts are emphasis-parsed, tokenized without start/end tokens, packed into chunks of 75 tokens (a `BREAK`
forces a new chunk; with comma back-tracking the words after the last comma move to the next chunk; an
embedding that does not fit starts a new chunk), each chunk becomes `[start] + 75 + [end]` padded with the end
token, SD 2.x replaces everything after the first end token with the pad id 0, the embedding's vectors replace
the placeholder rows of the token-embedding output, the transformer runs, and the emphasis multipliers are
applied with A1111's mean-preserving renormalisation. Chunks are concatenated on the token axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ti_trainer.text.prompt_parser import parse_prompt_attention

CHUNK_LENGTH = 75
# An embedding's name in prompts -> its vectors [n, width]; for a model with several text encoders (SDXL), a
# dict of them per encoder key (text/multi_encoder.py).
VectorsByName = dict[str, torch.Tensor | dict[str, torch.Tensor]]


@dataclass
class TextRules:
    """The WebUI options that change how a prompt becomes conditioning."""

    # A1111's choices: "Original" | "No norm" | "Ignore" | "None"; it treats any other name as "Original".
    emphasis: str = "Original"
    comma_padding_backtrack: int = 20


@dataclass
class PromptChunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)  # (offset in chunk, embedding name)


@dataclass(frozen=True)
class TokenIds:
    start: int
    end: int
    pad: int  # SD 2.x: 0; SD 1.x: the end token (so nothing is replaced)
    comma: int


class PromptChunker:
    """Tokenizes prompts into A1111's 75-token chunks, recording where registered embeddings sit."""

    def __init__(
        self,
        tokenize: Callable[[list[str]], list[list[int]]],
        ids: TokenIds,
        rules: TextRules | None = None,
    ):
        self.tokenize = tokenize
        self.ids = ids
        self.rules = rules or TextRules()
        self._names: dict[str, tuple[int, ...]] = {}
        self._vectors_count: dict[str, int] = {}

    def register(self, name: str, num_vectors: int) -> None:
        """Make `name` recognised in prompts; matching is on its token ids, as in A1111."""
        self._names[name] = tuple(self.tokenize([name])[0])
        self._vectors_count[name] = num_vectors

    def unregister(self, name: str) -> None:
        self._names.pop(name, None)
        self._vectors_count.pop(name, None)

    def _embedding_at(self, tokens: list[int], position: int) -> tuple[str, int] | None:
        best = None
        for name, ids in self._names.items():
            if (
                ids
                and tuple(tokens[position : position + len(ids)]) == ids
                and (best is None or len(ids) > best[1])
            ):
                best = (name, len(ids))
        return best

    def chunks(self, line: str) -> tuple[list[PromptChunk], int]:
        """The chunks of one prompt and its token count (as the WebUI's counter shows it)."""
        parsed = [[line, 1.0]] if self.rules.emphasis == "None" else parse_prompt_attention(line)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def close_chunk(is_last: bool = False) -> None:
            nonlocal chunk, token_count, last_comma
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            missing = CHUNK_LENGTH - len(chunk.tokens)
            chunk.tokens = [self.ids.start] + chunk.tokens + [self.ids.end] * missing + [self.ids.end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * missing + [1.0]
            chunks.append(chunk)
            chunk = PromptChunk()
            last_comma = -1

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                close_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                backtrack = self.rules.comma_padding_backtrack
                if token == self.ids.comma:
                    last_comma = len(chunk.tokens)
                elif (
                    backtrack
                    and len(chunk.tokens) == CHUNK_LENGTH
                    and last_comma != -1
                    and len(chunk.tokens) - last_comma <= backtrack
                ):
                    # Keep the words after the last comma together by moving them to the next chunk.
                    cut = last_comma + 1
                    moved_tokens, moved_multipliers = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    close_chunk()
                    chunk.tokens, chunk.multipliers = moved_tokens, moved_multipliers
                if len(chunk.tokens) == CHUNK_LENGTH:
                    close_chunk()
                found = self._embedding_at(tokens, position)
                if found is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                name, name_length = found
                count = self._vectors_count[name]
                if len(chunk.tokens) + count > CHUNK_LENGTH:
                    close_chunk()
                chunk.fixes.append((len(chunk.tokens), name))
                chunk.tokens += [0] * count
                chunk.multipliers += [weight] * count
                position += name_length
        if chunk.tokens or not chunks:
            close_chunk(is_last=True)
        return chunks, token_count

    def token_count(self, line: str) -> tuple[int, int]:
        """(tokens used, tokens available before a new chunk starts), as the WebUI's prompt counter."""
        _, count = self.chunks(line)
        return count, math.ceil(max(count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH

    def empty_chunk(self) -> PromptChunk:
        return PromptChunk(
            tokens=[self.ids.start] + [self.ids.end] * (CHUNK_LENGTH + 1),
            multipliers=[1.0] * (CHUNK_LENGTH + 2),
        )


class InjectingTokenEmbedding(torch.nn.Module):
    """Wraps a token-embedding layer; rows listed in `fixes` are replaced by an embedding's vectors.

    Gradients flow from the output to the injected vectors only (the wrapped weights stay frozen). With no
    fixes set it is the wrapped layer exactly.
    """

    def __init__(self, wrapped: torch.nn.Embedding):
        super().__init__()
        self.wrapped = wrapped
        self.fixes: list[list[tuple[int, torch.Tensor]]] | None = None

    @property
    def weight(self) -> torch.Tensor:  # code that reads `token_embedding.weight` keeps working
        return self.wrapped.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.wrapped(input_ids)
        fixes, self.fixes = self.fixes, None
        if not fixes or not any(fixes):
            return out
        rows = []
        for row, row_fixes in zip(out, fixes):
            for offset, vectors in row_fixes:
                vectors = vectors.to(device=row.device, dtype=row.dtype)
                # +1 skips the start token; the row keeps its length.
                row = torch.cat([row[: offset + 1], vectors, row[offset + 1 + vectors.shape[0] :]])[
                    : out.shape[1]
                ]
            rows.append(row)
        return torch.stack(rows)


@contextmanager
def injector_installed(
    injector: InjectingTokenEmbedding, owner: torch.nn.Module, attribute: str
) -> Iterator[InjectingTokenEmbedding]:
    """Put `injector` in front of whatever `owner.<attribute>` is (the plain layer, or a host's own wrapper
    of it) for the duration, then put the original back: the model is changed only while a prompt encodes."""
    original = getattr(owner, attribute)
    injector.wrapped = original
    setattr(owner, attribute, injector)
    try:
        yield injector
    finally:
        setattr(owner, attribute, original)


class PromptEncoding(Protocol):
    """What the core asks of a backend's prompt encoder, whatever its model family: prompts (with the
    embeddings' vectors) -> the conditioning its backend's `predict` takes, and the prompt's chunking."""

    chunker: PromptChunker

    def __call__(self, prompts: list[str], vectors: dict) -> Any: ...

    def concat(self, conditionings: list) -> Any:
        """Conditionings of single prompts (the same number of chunks each) as one batch."""
        ...

    def chunk_count(self, prompt: str) -> int: ...

    def count_injections(self, prompt: str, name: str) -> int: ...


def prompt_batches(chunker: PromptChunker, prompts: list[str]) -> list[list[PromptChunk]]:
    """The prompts' chunks, chunk by chunk: batch i holds every prompt's chunk i (an empty chunk for a prompt
    that has fewer), as the WebUI encodes them."""
    per_prompt = [chunker.chunks(prompt)[0] for prompt in prompts]
    chunk_count = max(len(chunks) for chunks in per_prompt)
    return [
        [chunks[index] if index < len(chunks) else chunker.empty_chunk() for chunks in per_prompt]
        for index in range(chunk_count)
    ]


def chunk_token_ids(batch: list[PromptChunk], ids: TokenIds, pad: int, device: torch.device) -> torch.Tensor:
    """The chunks' token ids `[B, 77]`, with everything after the first end token replaced by `pad` where it
    is not the end token itself (SD 2.x's and SDXL bigG's OpenCLIP pad with id 0)."""
    token_rows = [list(chunk.tokens) for chunk in batch]
    if pad != ids.end:
        for row in token_rows:
            first_end = row.index(ids.end)
            row[first_end + 1 :] = [pad] * (len(row) - first_end - 1)
    return torch.tensor(token_rows, dtype=torch.long, device=device)


def chunk_fixes(
    batch: list[PromptChunk], vectors: dict[str, torch.Tensor]
) -> list[list[tuple[int, torch.Tensor]]]:
    """Where each chunk's embeddings go and their vectors (one encoder's), as `InjectingTokenEmbedding` takes."""
    return [[(offset, vectors[name]) for offset, name in chunk.fixes] for chunk in batch]


def apply_emphasis(z: torch.Tensor, batch: list[PromptChunk], emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one encoder's hidden states `[B, 77, width]` (sd_emphasis.py)."""
    if emphasis in ("None", "Ignore"):
        # "Ignore" still parses the brackets (they vanish from the text, BREAK still splits) but, like
        # "None", leaves the output unweighted.
        return z
    multipliers = torch.tensor([chunk.multipliers for chunk in batch], dtype=z.dtype, device=z.device)
    if emphasis == "No norm":
        return z * multipliers.unsqueeze(-1)
    original_mean = z.mean()
    z = z * multipliers.unsqueeze(-1)
    return z * (original_mean / z.mean())


def count_injections(chunker: PromptChunker, prompt: str, name: str) -> int:
    """How many times `name` is recognised in `prompt` (0 means training on it would learn nothing)."""
    return sum(1 for chunk in chunker.chunks(prompt)[0] for _, fix_name in chunk.fixes if fix_name == name)


class PromptEncoder:
    """Turns prompts into conditioning `[batch, 77 * chunks, width]` with trainable vectors injected.

    `encode_chunk(tokens [B, 77]) -> [B, 77, width]` runs the host's text transformer (with the model's
    layer choice: penultimate + final norm for SD 2.x) over token ids; `injector.fixes` is set just before.
    """

    def __init__(
        self,
        chunker: PromptChunker,
        injector: InjectingTokenEmbedding,
        encode_chunk: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str = "cpu",
    ):
        self.chunker = chunker
        self.injector = injector
        self.encode_chunk = encode_chunk
        self.device = torch.device(device)

    def __call__(self, prompts: list[str], vectors: VectorsByName) -> torch.Tensor:
        return torch.cat(
            [self._encode(batch, vectors) for batch in prompt_batches(self.chunker, prompts)], dim=1
        )

    def concat(self, conditionings: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(conditionings)

    def chunk_count(self, prompt: str) -> int:
        """How many 75-token chunks `prompt` takes: its conditioning is 77 times as many tokens long."""
        return len(self.chunker.chunks(prompt)[0])

    def count_injections(self, prompt: str, name: str) -> int:
        """How many times `name` is recognised in `prompt` (0 means training on it would learn nothing)."""
        return count_injections(self.chunker, prompt, name)

    def _encode(self, batch: list[PromptChunk], vectors: VectorsByName) -> torch.Tensor:
        ids = self.chunker.ids
        tokens = chunk_token_ids(batch, ids, ids.pad, self.device)
        self.injector.fixes = chunk_fixes(batch, vectors)
        z = self.encode_chunk(tokens)
        self.injector.fixes = None
        return apply_emphasis(z, batch, self.chunker.rules.emphasis)
