"""Training prompts from a template line, the embedding's name and an image's caption (A1111's semantics).

All randomness (line choice, tag dropout, tag shuffle) comes from the `random.Random` passed in, never the
global generator, so a run replays exactly from its seed and resumes where it stopped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ti_trainer.errors import UserError
from ti_trainer.text.templates import FILEWORDS_PLACEHOLDER, NAME_PLACEHOLDER, Template


def check_tag_dropout(tag_dropout: float) -> float:
    """`tag_dropout` as a float in [0, 1], or UserError saying what the setting means."""
    try:
        value = float(tag_dropout)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise UserError(
            f"Tag dropout must be between 0 and 1 (the chance that each caption tag is left out of a prompt), "
            f"not {tag_dropout!r}. 0 keeps every tag; 0.1 is a common choice."
        )
    return value


def build_prompt(
    line: str,
    name: str,
    caption: str,
    rng: random.Random,
    shuffle_tags: bool = False,
    tag_dropout: float = 0.0,
) -> str:
    """`line` with `[filewords]` replaced by the caption's comma-separated tags and `[name]` by `name`.

    Each tag is dropped with probability `tag_dropout`, the rest optionally shuffled, then rejoined with ","
    keeping each tag's own spacing, exactly as A1111 does so prompts match what artists know.
    """
    tag_dropout = check_tag_dropout(tag_dropout)
    tags = caption.split(",")
    if tag_dropout != 0:  # like A1111, draw nothing when off, so the rng stream matches its call pattern
        tags = [tag for tag in tags if rng.random() > tag_dropout]
    if shuffle_tags:
        rng.shuffle(tags)
    # Filewords first, as A1111 does: a caption that writes "[name]" itself gets the embedding there too.
    return line.replace(FILEWORDS_PLACEHOLDER, ",".join(tags)).replace(NAME_PLACEHOLDER, name)


@dataclass(frozen=True)
class PromptBuilder:
    """Builds a fresh training prompt for a caption on every call: a random template line, dropout, shuffle.

    Unlike A1111, which fixes one prompt per image at load time when neither shuffle nor dropout is on, the
    line is drawn anew every time, so every template line gets used across epochs.
    """

    template: Template
    name: str
    shuffle_tags: bool = False
    tag_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_tag_dropout(self.tag_dropout)
        if not self.template.lines:
            raise UserError(f"The prompt template {self.template.path} has no lines to build prompts from.")

    def __call__(self, caption: str, rng: random.Random) -> str:
        line = rng.choice(self.template.lines)
        return build_prompt(line, self.name, caption, rng, self.shuffle_tags, self.tag_dropout)
