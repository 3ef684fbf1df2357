"""Caption tools: combining with existing captions, saving one, find and replace in all, and the lint."""

from __future__ import annotations

import os

import pytest
from PIL import Image
from test_prepare_drawing import BLUE_GREEN, painting

from ti_trainer.backends.clip_bpe import tiny_tokenizer
from ti_trainer.errors import UserError
from ti_trainer.prepare.captions import (
    combine_captions,
    dataset_captions,
    find_and_replace,
    save_caption,
)
from ti_trainer.prepare.lint import (
    CHUNK_TOKENS,
    TokenBudget,
    lint_captions,
    lint_dataset,
    token_counter,
    word_stem,
)
from ti_trainer.text.conditioning import CHUNK_LENGTH, PromptChunker, TokenIds

SEED_INIT_TEXT = "oil painting, classic style, richly textured"


def dataset(folder, captions: dict[str, str | None]):
    folder.mkdir(parents=True, exist_ok=True)
    for index, (name, caption) in enumerate(captions.items()):
        painting(index, BLUE_GREEN, (64, 64)).save(folder / f"{name}.png")
        if caption is not None:
            (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return folder


def test_combine_captions_as_a1111():
    assert combine_captions("old", "new", "ignore") == "new"
    assert combine_captions("old", "new", "keep") == "old"
    assert combine_captions(None, "new", "keep") == "new"
    assert combine_captions("old", "new", "prepend") == "old new"
    assert combine_captions("old", "new", "append") == "new old"
    assert combine_captions("  ", "new", "prepend") == "new"
    assert combine_captions("old", "", "append") == "old"
    with pytest.raises(UserError, match="ignore, keep, prepend, append"):
        combine_captions("old", "new", "copy")


def test_save_caption_writes_utf8_and_stays_in_the_folder(tmp_path):
    folder = dataset(tmp_path / "data", {"a": "old"})
    path = save_caption(folder, "a.png", "  two girls at a piano, framed pictures on the wall \n")
    assert path == folder / "a.txt"
    assert path.read_bytes() == b"two girls at a piano, framed pictures on the wall"
    save_caption(folder, "a.png", "café")
    assert dataset_captions(folder)[0].caption == "café"
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(UserError, match="not a file name"):
        save_caption(folder, "../a.png", "escape")
    with pytest.raises(UserError, match="no longer exists"):
        save_caption(folder, "gone.png", "text")


def test_dataset_captions_fall_back_to_file_names(tmp_path):
    folder = dataset(tmp_path / "data", {"00003-0-red barn": None, "b": "a boat"})
    entries = {entry.image.name: entry for entry in dataset_captions(folder)}
    assert entries["00003-0-red barn.png"].caption == "red barn"
    assert not entries["00003-0-red barn.png"].has_file
    assert entries["b.png"].caption == "a boat" and entries["b.png"].has_file


def test_find_and_replace_across_all_captions(tmp_path):
    folder = dataset(
        tmp_path / "data",
        {
            "a": "a harbour, Oil Painting, boats",
            "b": "a barn, oil painting",
            "c": "a boiling kettle",
            "d": None,
        },
    )
    untouched = folder / "c.txt"
    stamp = untouched.stat().st_mtime_ns
    os.utime(untouched, ns=(stamp - 10**9, stamp - 10**9))
    result = find_and_replace(folder, "oil painting", "", whole_words=True)
    assert result.replacements == 2 and sorted(p.name for p in result.changed) == ["a.txt", "b.txt"]
    assert (folder / "a.txt").read_text(encoding="utf-8") == "a harbour, boats"
    assert (folder / "b.txt").read_text(encoding="utf-8") == "a barn"
    assert untouched.stat().st_mtime_ns == stamp - 10**9
    assert not (folder / "d.txt").exists()

    assert find_and_replace(folder, "oil", "x", whole_words=True).replacements == 0  # "boiling" is not "oil"
    result = find_and_replace(folder, r"a (\w+)$", r"the \1", regex=True, match_case=True)
    assert (folder / "b.txt").read_text(encoding="utf-8") == "the barn"
    with pytest.raises(UserError, match="empty search"):
        find_and_replace(folder, "", "x")
    with pytest.raises(UserError, match="not a valid regular expression"):
        find_and_replace(folder, "(", "x", regex=True)


def test_word_stems_match_word_forms():
    assert word_stem("painting") == word_stem("painted") == word_stem("paints") == word_stem("paint")
    assert word_stem("textured") == word_stem("texture")
    assert word_stem("glasses") == word_stem("glass")
    assert word_stem("red") == "red"


def test_lint_flags_init_text_words_and_empty_captions(tmp_path):
    folder = dataset(
        tmp_path / "data",
        {
            "a": "two girls in period dresses at a piano",
            "b": "a painted street with telephone poles",
            "c": "   ",
            "d": None,
            "e": "Richly coloured sky over a road",
        },
    )
    findings = lint_captions(dataset_captions(folder), SEED_INIT_TEXT)
    kinds = {(f.image, f.kind) for f in findings}
    assert kinds == {
        ("b.png", "init-words"),
        ("c.png", "empty"),
        ("d.png", "no-caption-file"),
        ("e.png", "init-words"),
    }
    by_image = {f.image: f.message for f in findings if f.kind == "init-words"}
    assert "'painted'" in by_image["b.png"] and "'Richly'" in by_image["e.png"]
    # "style" and A1111's default "*" say nothing about the captions.
    assert lint_captions(dataset_captions(folder), "*") == [f for f in findings if f.kind != "init-words"]


def tiny_chunker() -> PromptChunker:
    tokenizer = tiny_tokenizer()
    ids = TokenIds(start=tokenizer.start_id, end=tokenizer.end_id, pad=0, comma=tokenizer.comma_id)
    return PromptChunker(tokenizer, ids)


def test_lint_flags_captions_that_overflow_the_token_budget(tmp_path):
    long_caption = ", ".join(f"a small {word} house" for word in "red blue green grey white pink".split() * 3)
    folder = dataset(tmp_path / "data", {"short": "a boat on a lake", "long": long_caption})
    chunker = tiny_chunker()
    budget = TokenBudget(["[filewords], [name]"], "myart", token_counter(chunker, "myart", 8))
    findings = lint_captions(dataset_captions(folder), budget=budget)
    assert [(f.image, f.kind) for f in findings] == [("long.png", "token-budget")]
    assert "myart" in findings[0].message
    # The embedding's vectors count: with 74 of them even a short caption overflows.
    many = TokenBudget(["[filewords], [name]"], "myart", token_counter(chunker, "myart", 74))
    assert {f.image for f in lint_captions(dataset_captions(folder), budget=many)} == {
        "short.png",
        "long.png",
    }
    assert chunker._names == {}  # the backend's chunker is left as it was
    assert CHUNK_TOKENS == CHUNK_LENGTH


def test_lint_dataset_flags_near_duplicate_images(tmp_path):
    folder = dataset(tmp_path / "data", {"a": "a lake", "b": "a hill", "c": "a road"})
    original = painting(7, BLUE_GREEN, (200, 200))
    original.save(folder / "orig.png")
    original.resize((150, 150), Image.LANCZOS).save(folder / "resaved.jpg", quality=80)
    report = lint_dataset(dataset_captions(folder))
    duplicates = sorted(f.image for f in report.findings if f.kind == "near-duplicate")
    assert duplicates == ["orig.png", "resaved.jpg"]
    assert any("token budget" in note for note in report.notes)
