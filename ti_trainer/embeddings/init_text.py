"""Which initialization-text tokens the new embedding's vectors start from (reference/a1111.md §1.4).

A1111's rule: vector i copies token floor(i * tokens / vectors). Fewer tokens than vectors repeats each token
in blocks (2 tokens, 4 vectors -> 1,1,2,2); more tokens than vectors strides through them (4 tokens, 2 vectors
-> 1,3), leaving some out. The Create panel and the CLI's `create` say it in the same words; no torch here.
"""

from __future__ import annotations


def source_token(vector: int, tokens: int, vectors: int) -> int:
    """The index of the token that vector `vector` (0-based) starts from."""
    return vector * tokens // vectors


def vector_sources(tokens: int, vectors: int) -> list[int]:
    """For each vector, the 0-based token it starts from; empty when there are no tokens (vectors are zero)."""
    return [source_token(i, tokens, vectors) for i in range(vectors)] if tokens else []


def init_mapping(tokens: int, vectors: int) -> str:
    """How `tokens` initialization tokens map onto `vectors` vectors, in one sentence for the artist."""
    if tokens == 0:
        return "No initialization text: the vectors start at zero and learn everything."
    word = "token" if tokens == 1 else "tokens"
    if tokens == vectors:
        return f"{tokens} {word}: each vector starts from one of them."
    if tokens < vectors:
        return (
            f"{tokens} {word} for {vectors} vectors: each token starts about {vectors / tokens:.1f} vectors."
        )
    used = sorted(set(vector_sources(tokens, vectors)))
    return (
        f"{tokens} {word} for {vectors} vectors: only {len(used)} of them are used "
        f"(tokens {', '.join(str(i + 1) for i in used)}). Use more vectors or fewer words to keep them all."
    )


def vector_lines(token_texts: list[str], vectors: int) -> list[str]:
    """One line per vector: `vector 2 <- token 3 'paint'` (1-based, as the artist counts)."""
    sources = vector_sources(len(token_texts), vectors)
    return [f"vector {i + 1} <- token {token + 1} {token_texts[token]!r}" for i, token in enumerate(sources)]
