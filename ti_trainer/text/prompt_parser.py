"""A1111's prompt attention syntax: `(word)` x1.1, `[word]` /1.1, `(word:1.5)`, `\\(` escapes, `BREAK`.

The parse must match the WebUI's so that a caption or template with brackets conditions the model during
training exactly as it will when the artist generates (DESIGN invariant 1).
"""

from __future__ import annotations

import re

# One token of the syntax per match: escapes, brackets, a ":weight)" closer, plain text, or a lone colon.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\    # escaped brackets and backslashes
    | \(  | \[                              # openers
    | :\s*([+-]?[.\d]+)\s*\)                # explicit weight closing a round bracket
    | \)  | \]                              # closers
    | [^\\()\[\]:]+                         # plain text
    | :                                     # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1


def parse_prompt_attention(text: str) -> list[list]:
    """Split `text` into `[fragment, weight]` pairs; `["BREAK", -1]` marks a forced chunk break."""
    parts: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(parts))
        elif token == "[":
            open_square.append(len(parts))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for index, piece in enumerate(_BREAK.split(token)):
                if index > 0:
                    parts.append(["BREAK", -1])
                parts.append([piece, 1.0])

    # Brackets left open apply to the end of the prompt.
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not parts:
        return [["", 1.0]]
    merged = [parts[0]]
    for part in parts[1:]:
        if part[1] == merged[-1][1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    return merged
