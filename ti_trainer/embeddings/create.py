"""Create a new embedding file from initialization text (reference/a1111.md §1.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ti_trainer.embeddings.embedding import Embedding, vectors_from_init_per_encoder
from ti_trainer.embeddings.files import save_embedding
from ti_trainer.embeddings.init_text import init_mapping, vector_lines
from ti_trainer.embeddings.vectors import Vectors
from ti_trainer.errors import UserError
from ti_trainer.fsutil import confined_path, validate_embedding_name
from ti_trainer.text.conditioning import PromptEncoding

MAX_VECTORS = 75  # one chunk of prompt tokens


class TokenSource(Protocol):
    """What creating an embedding reads of a model. Every `Backend` (backends/contract.py) has these members;
    they are named here by shape because embeddings/ lies below backends/ and imports nothing from it."""

    family: Any  # backends/contract.py `ModelFamily`: its text encoders, and the form of their vectors
    prompt_encoder: PromptEncoding

    def token_vectors(self, text: str) -> Vectors: ...


def existing_embedding_file(embeddings_dir: Path, name: str) -> Path | None:
    """`<name>.pt` or `.safetensors` in the embeddings folder, or else in a subfolder of it (the WebUI loads
    those too, so its list offers them)."""
    folder = Path(embeddings_dir)
    for suffix in (".pt", ".safetensors"):
        path = confined_path(folder, name, suffix)
        if path.is_file():
            return path
    if folder.is_dir():
        for suffix in (".pt", ".safetensors"):
            found = sorted(p for p in folder.rglob(f"*{suffix}") if p.stem == name and p.is_file())
            if found:
                return found[0]
    return None


def create_embedding(
    backend: TokenSource,
    name: str,
    init_text: str,
    num_vectors: int,
    embeddings_dir: Path,
    overwrite: bool = False,
) -> Path:
    """Write `<embeddings_dir>/<name>.pt` (SDXL: `.safetensors`) at step 0, initialised from `init_text`'s
    token embeddings."""
    name = validate_embedding_name(name)
    if not 1 <= num_vectors <= MAX_VECTORS:
        raise UserError(f"Vectors per token must be between 1 and {MAX_VECTORS} (got {num_vectors}).")
    embeddings_dir = Path(embeddings_dir)
    existing = existing_embedding_file(embeddings_dir, name)
    if existing and not overwrite:
        raise UserError(
            f"An embedding named {name!r} already exists: {existing}. Choose another name, or overwrite it "
            "(--overwrite / 'Overwrite old embedding')."
        )
    # Each text encoder's vectors start from its own token embeddings of the same tokens (SDXL: CLIP-L's and
    # bigG's), by A1111's token-to-vector rule.
    init = backend.token_vectors(init_text) if init_text else None
    zeros = backend.family.zero_vectors(num_vectors)
    embedding = Embedding(name, vectors_from_init_per_encoder(init, num_vectors, zeros), step=0)
    # SDXL: .safetensors, which keeps the step and loads everywhere (a .pt could hold the two tensors only).
    suffix = ".safetensors" if backend.family.vectors_per_encoder else ".pt"
    path = confined_path(embeddings_dir, name, suffix)
    return save_embedding(embedding, path)


def init_token_counts(backend: TokenSource, init_text: str) -> dict[str, int]:
    """How many tokens `init_text` is for each text encoder (SDXL: CLIP-L's and bigG's tokenizers), counted
    as `create` takes them: each encoder's own token vectors."""
    if not (init_text or "").strip():
        return {spec.key: 0 for spec in backend.family.text_encoders}
    keyed = backend.family.keyed_vectors(backend.token_vectors(init_text))
    return {key: int(tensor.shape[0]) for key, tensor in keyed.items()}


def per_encoder_count_line(counts: dict[str, int]) -> str:
    """ "Tokens per text encoder: clip_l 2, clip_g 2." """
    return "Tokens per text encoder: " + ", ".join(f"{key} {count}" for key, count in counts.items()) + "."


def init_text_report(backend: TokenSource, init_text: str, num_vectors: int) -> list[str]:
    """Which tokens of `init_text` each vector starts from, as `create` builds them (the panel's sentence, then
    one line per vector with the token's text where the tokenizer can spell it)."""
    tokenize = backend.prompt_encoder.chunker.tokenize
    ids = tokenize([init_text])[0] if (init_text or "").strip() else []
    decode = getattr(tokenize, "decode", None)
    texts = [decode([token]) if decode else f"id {token}" for token in ids]
    lines = [init_mapping(len(ids), num_vectors)]
    if backend.family.vectors_per_encoder:
        lines.append(per_encoder_count_line(init_token_counts(backend, init_text)))
    return [*lines, *vector_lines(texts, num_vectors)]
