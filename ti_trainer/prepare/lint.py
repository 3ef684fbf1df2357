"""Caption lint: what in a dataset's captions works against the embedding, found before training.

- words of the initialization text in a caption: the seed's rule is that captions describe only what is
  incidental; a word the embedding should learn, written in the caption, is explained away by the caption;
- empty captions, and images without a caption file (they train on their file name);
- captions that make a training prompt overflow one 75-token chunk once the template and the embedding's
  vectors are added;
- near-duplicate images, which count double.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ti_trainer.images import ImageLoadError, ImageProblem, load_image
from ti_trainer.prepare.captions import CaptionEntry
from ti_trainer.prepare.phash import near_duplicate_groups, perceptual_hash
from ti_trainer.text.templates import FILEWORDS_PLACEHOLDER, NAME_PLACEHOLDER

if TYPE_CHECKING:  # the conditioning module pulls in torch, which a report without a model does not need
    from ti_trainer.text.conditioning import PromptChunker

# One CLIP chunk (ti_trainer.text.conditioning.CHUNK_LENGTH): past it the WebUI starts a second chunk.
CHUNK_TOKENS = 75

# Words too common to mean anything when they appear in both the init text and a caption.
_STOP_WORDS = frozenset(
    "a an and the of in on at to for with by from or as is are it its this that style art".split()
)
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_SUFFIXES = ("ing", "ed", "ly", "s")


@dataclass
class LintFinding:
    image: str  # file name
    kind: str  # "init-words" | "empty" | "no-caption-file" | "token-budget" | "near-duplicate"
    message: str


@dataclass
class TokenBudget:
    """How long the training prompts get: the template's lines, the embedding's name, a token counter."""

    template_lines: list[str]
    name: str
    count_tokens: Callable[[str], int]
    limit: int = CHUNK_TOKENS


@dataclass
class LintReport:
    findings: list[LintFinding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def token_counter(chunker: PromptChunker, name: str, vectors: int) -> Callable[[str], int]:
    """Counts a prompt's tokens as the WebUI does, with `name` standing for its `vectors` vectors.

    A private chunker over the same tokenizer, so the backend's own registered names are left alone.
    """
    from ti_trainer.text.conditioning import PromptChunker

    private = PromptChunker(chunker.tokenize, chunker.ids, chunker.rules)
    private.register(name, vectors)
    return lambda prompt: private.token_count(prompt)[0]


def word_stem(word: str) -> str:
    """ "painting", "painted", "paints" -> "paint": so a caption saying "painted" is caught by "painting"."""
    word = word.lower()
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    # "texture"/"textured", "dance"/"dancing", "glass"/"glasses" meet at the same stem.
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def init_text_stems(init_text: str) -> dict[str, str]:
    """Stem -> the word as written in the init text, leaving out common words (and A1111's default "*")."""
    stems = {}
    for word in _WORD.findall(init_text or ""):
        if word.lower() not in _STOP_WORDS and len(word) > 2:
            stems.setdefault(word_stem(word), word)
    return stems


def lint_captions(
    entries: list[CaptionEntry], init_text: str = "", budget: TokenBudget | None = None
) -> list[LintFinding]:
    stems = init_text_stems(init_text)
    findings = []
    for entry in entries:
        name = entry.image.name
        if not entry.has_file:
            findings.append(
                LintFinding(
                    name,
                    "no-caption-file",
                    f"no caption file: training uses words from the file name ({entry.caption!r})",
                )
            )
        elif not entry.caption.strip():
            findings.append(
                LintFinding(name, "empty", "the caption is empty: write what is incidental in this image")
            )
        found = sorted({word for word in _WORD.findall(entry.caption) if word_stem(word) in stems})
        if found:
            findings.append(
                LintFinding(
                    name,
                    "init-words",
                    f"the caption says {', '.join(repr(w) for w in found)}, which the initialization text is about: "
                    "describe only what is incidental, so the embedding learns the rest",
                )
            )
        if budget is not None:
            overflow = _longest_prompt(entry.caption, budget)
            if overflow is not None:
                tokens, prompt = overflow
                findings.append(
                    LintFinding(
                        name,
                        "token-budget",
                        f"the training prompt is {tokens} tokens, over one {budget.limit}-token chunk, with the "
                        f"embedding's vectors counted: {prompt!r}. Shorten the caption or use fewer vectors",
                    )
                )
    return findings


def _longest_prompt(caption: str, budget: TokenBudget) -> tuple[int, str] | None:
    """The longest training prompt of `caption` over the budget, as (tokens, prompt); None when all fit."""
    with_caption = [line for line in budget.template_lines if FILEWORDS_PLACEHOLDER in line]
    if with_caption and budget.count_tokens(caption) > budget.limit:
        # Over the budget on its own: count only the line with the most words of its own, as tokenizing a
        # huge caption (a pasted megabyte) once per template line would take minutes.
        line = max(
            with_caption, key=lambda text: budget.count_tokens(text.replace(FILEWORDS_PLACEHOLDER, ""))
        )
        prompt = line.replace(FILEWORDS_PLACEHOLDER, caption).replace(NAME_PLACEHOLDER, budget.name)
        return budget.count_tokens(prompt), prompt
    longest: tuple[int, str] | None = None
    for line in budget.template_lines:
        prompt = line.replace(FILEWORDS_PLACEHOLDER, caption).replace(NAME_PLACEHOLDER, budget.name)
        tokens = budget.count_tokens(prompt)
        if tokens > budget.limit and (longest is None or tokens > longest[0]):
            longest = (tokens, prompt)
    return longest


def over_budget(captions: list[tuple[str, str]], budget: TokenBudget) -> list[tuple[str, int]]:
    """(source, tokens) for each (source, caption) whose longest training prompt is over the budget; a caption
    shared by several images is counted once."""
    counted: dict[str, tuple[int, str] | None] = {}
    found = []
    for source, caption in captions:
        if caption not in counted:
            counted[caption] = _longest_prompt(caption, budget)
        if counted[caption] is not None:
            found.append((source, counted[caption][0]))
    return found


def duplicate_findings(groups: list[list[str]]) -> list[LintFinding]:
    findings = []
    for group in groups:
        for name in group:
            others = ", ".join(other for other in group if other != name)
            findings.append(
                LintFinding(
                    name,
                    "near-duplicate",
                    f"looks almost the same as {others}: it will count double; keep the better one",
                )
            )
    return findings


def image_hashes(paths: list[Path]) -> dict[str, int]:
    """Perceptual hash per image file name; images that cannot be read are left out (the report names them)."""
    hashes = {}
    for path in paths:
        try:
            hashes[path.name] = perceptual_hash(load_image(path))
        except ImageLoadError:
            continue
    return hashes


def lint_dataset(
    entries: list[CaptionEntry],
    init_text: str = "",
    budget: TokenBudget | None = None,
    check_duplicates: bool = True,
    skipped: list[ImageProblem] | None = None,
) -> LintReport:
    """Every finding for a dataset, caption by caption, then its near-duplicate images.

    `skipped`: the folder's entries that are not images (from `caption_listing`), named in the notes.
    """
    report = LintReport(lint_captions(entries, init_text, budget))
    report.notes += [f"skipped {problem.path.name}: {problem.reason}" for problem in skipped or []]
    if check_duplicates:
        report.findings += duplicate_findings(near_duplicate_groups(image_hashes([e.image for e in entries])))
    if not init_text_stems(init_text):
        report.notes.append(
            "No initialization text given (or only '*'): captions were not checked against it."
        )
    if budget is None:
        report.notes.append(
            "No tokenizer given (a model): the token budget of the training prompts was not checked."
        )
    return report
