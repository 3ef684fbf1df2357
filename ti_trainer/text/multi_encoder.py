"""Prompt -> conditioning for a model with several text encoders (SDXL), with the WebUI's rules.

A1111 wraps each of SDXL's text encoders on its own (sd_hijack_clip.py; reference/sdxl.md §2): each tokenizes
the prompt into the same 75-token chunks (the encoders share CLIP's BPE), pads with its own id (CLIP-L with
the end token, OpenCLIP bigG with 0 after the first end token), takes its own part of the embedding's vectors
(`clip_l` or `clip_g`) at the positions of the name, runs its transformer, and weights its hidden states with
the emphasis on its own (the mean-preserving rescale is per encoder). sgm then concatenates the hidden states
on the width axis, in the encoders' order, and keeps bigG's pooled output of the first chunk, unweighted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ti_trainer.text.conditioning import (
    InjectingTokenEmbedding,
    PromptChunker,
    apply_emphasis,
    chunk_fixes,
    chunk_token_ids,
    count_injections,
    prompt_batches,
)

# One encoder's pass over a chunk of token ids [B, 77]: its hidden states [B, 77, width] (the model's layer
# choice) and, for the encoder whose pooled output conditions the UNet, that output [B, pooled width].
EncodeChunk = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class EncoderPath:
    key: str  # which vectors of an embedding this encoder takes ("clip_l", "clip_g")
    injector: InjectingTokenEmbedding  # or what takes `.fixes` alike (Forge: EngineFixes)
    encode_chunk: EncodeChunk
    pad: int  # the id after the first end token (the end token itself: no replacement)


@dataclass
class TextConditioning:
    """Every encoder's hidden states concatenated on the width axis, and the pooled text of the first chunk."""

    hidden: torch.Tensor  # [B, 77 * chunks, sum of widths]
    pooled: torch.Tensor  # [B, pooled width]


class MultiEncoderPromptEncoder:
    """The `PromptEncoding` (text/conditioning.py) of a model with several text encoders: prompts and each
    name's vectors per encoder key -> `TextConditioning`."""

    def __init__(self, chunker: PromptChunker, paths: list[EncoderPath], device: torch.device | str = "cpu"):
        self.chunker = chunker
        self.paths = paths
        self.device = torch.device(device)

    def __call__(self, prompts: list[str], vectors: dict[str, dict[str, torch.Tensor]]) -> TextConditioning:
        hidden, pooled = [], None
        for index, batch in enumerate(prompt_batches(self.chunker, prompts)):
            per_encoder = []
            for path in self.paths:
                z, pool = self._encode(path, batch, {name: own[path.key] for name, own in vectors.items()})
                per_encoder.append(z)
                if index == 0 and pool is not None:
                    pooled = pool  # the WebUI keeps the first chunk's pooled output only
            hidden.append(torch.cat(per_encoder, dim=-1))
        if pooled is None:
            raise ValueError("none of the text encoders gives a pooled output")
        return TextConditioning(torch.cat(hidden, dim=1), pooled)

    def concat(self, conditionings: list[TextConditioning]) -> TextConditioning:
        return TextConditioning(
            torch.cat([c.hidden for c in conditionings]), torch.cat([c.pooled for c in conditionings])
        )

    def chunk_count(self, prompt: str) -> int:
        return len(self.chunker.chunks(prompt)[0])

    def count_injections(self, prompt: str, name: str) -> int:
        return count_injections(self.chunker, prompt, name)

    def _encode(self, path: EncoderPath, batch, vectors: dict[str, torch.Tensor]):
        tokens = chunk_token_ids(batch, self.chunker.ids, path.pad, self.device)
        path.injector.fixes = chunk_fixes(batch, vectors)
        try:
            z, pooled = path.encode_chunk(tokens)
        finally:
            path.injector.fixes = None
        # Emphasis weights the hidden states only; the pooled output goes to the UNet unweighted.
        return apply_emphasis(z, batch, self.chunker.rules.emphasis), pooled
