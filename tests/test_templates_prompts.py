"""Prompt templates (shipped files, listing, reading) and prompt building (A1111 semantics, seeded rng)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from ti_trainer.errors import UserError
from ti_trainer.text.prompts import PromptBuilder, build_prompt
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR, Template, list_templates, read_template

SHIPPED = {"style.txt", "style_filewords.txt", "subject.txt", "subject_filewords.txt", "filewords_name.txt"}
CAPTION = "a red fox, snowy field,  dusk light,tall grass, a fence"
CAPTION_TAGS = CAPTION.split(",")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def template_of(*lines: str) -> Template:
    return Template(path=Path("test.txt"), lines=list(lines), warnings=[])


def filewords_of(prompt: str, name: str = "fox") -> list[str]:
    """The tags that replaced [filewords] in a '[filewords] by [name]' prompt."""
    filewords = prompt.removesuffix(f" by {name}")
    return filewords.split(",") if filewords else []


# --- shipped templates ---------------------------------------------------------------------------------------


def test_shipped_templates_are_listed_by_default():
    listed = list_templates()
    assert set(listed) == SHIPPED
    assert all(path.parent == BUILTIN_TEMPLATES_DIR for path in listed.values())


@pytest.mark.parametrize("file_name", sorted(SHIPPED - {"filewords_name.txt"}))
def test_shipped_templates_are_varied_and_use_the_placeholders(file_name):
    template = read_template(BUILTIN_TEMPLATES_DIR / file_name)
    assert 15 <= len(template.lines) <= 25
    assert len(set(template.lines)) == len(template.lines)
    assert template.warnings == []
    assert all("[name]" in line for line in template.lines)
    if "filewords" in file_name:
        assert all("[filewords]" in line for line in template.lines)


def test_shipped_templates_are_not_copies_of_a1111s():
    a1111_lines = {
        "a painting, art by [name]",
        "a painting of [filewords], art by [name]",
        "a photo of a [name]",
    }
    for path in list_templates().values():
        assert not a1111_lines & set(read_template(path).lines), path.name


def test_filewords_name_template_is_the_tutorial_one():
    assert read_template(BUILTIN_TEMPLATES_DIR / "filewords_name.txt").lines == ["[filewords], [name]"]


# --- listing -------------------------------------------------------------------------------------------------


def test_list_templates_is_recursive_and_earlier_folders_win(tmp_path):
    user = tmp_path / "user"
    write(user / "custom.txt", "[filewords], [name]")
    write(user / "nested" / "deep" / "portrait.txt", "[name]")
    write(user / "style.txt", "my own [name]")
    write(user / "nested" / "custom.txt", "shadowed by the shallower file")
    write(user / "notes.md", "not a template")

    listed = list_templates(user, BUILTIN_TEMPLATES_DIR)

    assert listed["custom.txt"] == user / "custom.txt"
    assert listed["portrait.txt"] == user / "nested" / "deep" / "portrait.txt"
    assert listed["style.txt"] == user / "style.txt"
    assert listed["subject.txt"] == BUILTIN_TEMPLATES_DIR / "subject.txt"
    assert "notes.md" not in listed
    assert list(listed) == sorted(listed)


def test_list_templates_skips_missing_folders(tmp_path):
    assert list_templates(tmp_path / "missing") == {}
    assert set(list_templates(tmp_path / "missing", BUILTIN_TEMPLATES_DIR)) == SHIPPED


# --- reading -------------------------------------------------------------------------------------------------


def test_blank_lines_are_dropped_and_lines_stripped(tmp_path):
    path = write(tmp_path / "t.txt", "\n  a [name] painting  \n\n   \n[filewords], [name]\n\n")
    template = read_template(path)
    assert template.lines == ["a [name] painting", "[filewords], [name]"]
    assert template.path == path
    assert template.warnings == []


def test_template_with_bom_and_crlf(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeff[filewords], [name]\r\nart by [name]\r\n".encode())
    assert read_template(path).lines == ["[filewords], [name]", "art by [name]"]


def test_missing_template(tmp_path):
    with pytest.raises(UserError, match="does not exist") as caught:
        read_template(tmp_path / "gone.txt")
    assert "gone.txt" in str(caught.value)


def test_empty_template(tmp_path):
    path = write(tmp_path / "blank.txt", "\n \n")
    with pytest.raises(UserError, match="empty") as caught:
        read_template(path)
    assert "blank.txt" in str(caught.value)


def test_template_without_name_is_refused_before_training(tmp_path):
    path = write(tmp_path / "hypernetwork.txt", "a photo of [filewords]\npicture\n")

    with pytest.raises(UserError) as caught:
        read_template(path)

    message = str(caught.value)
    assert "hypernetwork.txt" in message
    assert "[name]" in message
    assert "never appear" in message
    assert "nothing would be learned" in message
    assert "style_filewords.txt" in message


def test_lines_without_name_are_left_out_with_a_warning_naming_them(tmp_path):
    path = write(tmp_path / "mixed.txt", "a [name]\n\nno name here\n[name] b\nplain\n")

    template = read_template(path)

    assert template.lines == ["a [name]", "[name] b"]
    (warning,) = template.warnings
    assert "Lines 3, 5" in warning  # the file's own line numbers, blank lines counted
    assert str(path) in warning and "left out" in warning


@pytest.mark.parametrize(
    "content",
    [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR [name]", bytes(range(256)) + b"\n[name], [filewords]\n"],
)
def test_a_binary_file_is_refused_as_not_text(tmp_path, content):
    path = tmp_path / "image.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a text file") as error:
        read_template(path)
    assert str(path) in str(error.value)


def test_utf16_and_cp1252_templates_are_text(tmp_path):
    path = tmp_path / "notepad.txt"
    path.write_bytes("[name], caf\u00e9 style\r\n".encode("utf-16"))
    assert read_template(path).lines == ["[name], caf\u00e9 style"]
    path.write_bytes("[name], caf\u00e9 style\r\n".encode("cp1252"))
    assert read_template(path).lines == ["[name], caf\u00e9 style"]


def test_mistyped_placeholder_is_pointed_out(tmp_path):
    path = write(tmp_path / "typo.txt", "a painting, art by [Name]\n[file words], [name]\n")

    with pytest.raises(UserError, match=r"did you mean \[name\]"):
        read_template(write(tmp_path / "only_typo.txt", "art by [Name]\n"))
    template = read_template(path)

    assert any("[file words]" in w and "[filewords]" in w for w in template.warnings)
    assert any("Line 1" in w and "[name]" in w for w in template.warnings)


def test_ordinary_brackets_are_not_flagged(tmp_path):
    # In A1111 prompts [word] means "less attention"; it is not a typo.
    assert read_template(write(tmp_path / "emphasis.txt", "[name], [blurry] background\n")).warnings == []


# --- build_prompt --------------------------------------------------------------------------------------------


def test_build_prompt_without_randomness_matches_a1111_and_draws_nothing():
    rng = random.Random(0)
    state = rng.getstate()

    prompt = build_prompt("[filewords], art by [name]", "fox-style", CAPTION, rng)

    assert prompt == f"{CAPTION}, art by fox-style"  # tag spacing kept exactly
    assert rng.getstate() == state


def test_build_prompt_replaces_every_occurrence():
    prompt = build_prompt("[name] and [name]: [filewords]", "fox", "x", random.Random(0))
    assert prompt == "fox and fox: x"


def test_dropout_one_removes_every_tag_and_zero_keeps_all():
    rng = random.Random(1)
    for _ in range(20):
        assert build_prompt("[filewords] by [name]", "fox", CAPTION, rng, tag_dropout=1.0) == " by fox"
        assert (
            build_prompt("[filewords] by [name]", "fox", CAPTION, rng, tag_dropout=0.0) == f"{CAPTION} by fox"
        )


def test_partial_dropout_keeps_an_ordered_subset_and_varies():
    rng = random.Random(2)
    kept_counts = []
    for _ in range(400):
        tags = filewords_of(build_prompt("[filewords] by [name]", "fox", CAPTION, rng, tag_dropout=0.5))
        assert tags == [tag for tag in CAPTION_TAGS if tag in tags]  # order and spacing untouched
        kept_counts.append(len(tags))
    mean_kept = sum(kept_counts) / len(kept_counts)
    assert 2.0 < mean_kept < 3.0  # 5 tags x 0.5 = 2.5 expected
    assert len(set(kept_counts)) > 3


def test_shuffle_keeps_the_same_tags_in_a_new_order():
    rng = random.Random(3)
    orders = set()
    for _ in range(50):
        tags = filewords_of(build_prompt("[filewords] by [name]", "fox", CAPTION, rng, shuffle_tags=True))
        assert Counter(tags) == Counter(CAPTION_TAGS)
        orders.add(tuple(tags))
    assert len(orders) > 10


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "often", None])
def test_tag_dropout_outside_zero_to_one_is_refused(bad):
    with pytest.raises(UserError, match="between 0 and 1"):
        build_prompt("[name]", "fox", "a", random.Random(0), tag_dropout=bad)
    with pytest.raises(UserError, match="between 0 and 1"):
        PromptBuilder(template_of("[name]"), "fox", tag_dropout=bad)


# --- PromptBuilder -------------------------------------------------------------------------------------------


def _builder() -> PromptBuilder:
    template = read_template(BUILTIN_TEMPLATES_DIR / "style_filewords.txt")
    return PromptBuilder(template, "fox-style", shuffle_tags=True, tag_dropout=0.2)


def _prompts_from_seed(seed: int, count: int = 30) -> list[str]:
    builder = _builder()
    rng = random.Random(seed)
    return [builder(CAPTION, rng) for _ in range(count)]


def test_same_seed_same_prompts_and_successive_calls_differ():
    first = _prompts_from_seed(42)
    second = _prompts_from_seed(42)
    other_seed = _prompts_from_seed(43)

    assert first == second
    assert first != other_seed
    assert len(set(first)) > 20  # drawn anew every call, not fixed per image as A1111 does
    assert all("fox-style" in prompt for prompt in first)


def test_every_template_line_gets_used_without_shuffle_or_dropout():
    template = template_of("one [name]", "two [name]", "three [name]")
    builder = PromptBuilder(template, "fox")
    rng = random.Random(5)
    assert {builder("cap", rng) for _ in range(60)} == {"one fox", "two fox", "three fox"}


def test_builder_uses_only_the_given_rng():
    random.seed(7)
    global_state = random.getstate()

    builder = _builder()
    rng = random.Random(1)
    for _ in range(20):
        builder(CAPTION, rng)

    assert random.getstate() == global_state


def test_resuming_from_a_saved_rng_state_continues_the_same_sequence():
    builder = _builder()
    rng = random.Random(9)
    uninterrupted = [builder(CAPTION, rng) for _ in range(20)]

    rng = random.Random(9)
    before_stop = [builder(CAPTION, rng) for _ in range(8)]
    saved = rng.getstate()
    resumed_rng = random.Random()
    resumed_rng.setstate(saved)
    after_resume = [builder(CAPTION, resumed_rng) for _ in range(12)]

    assert before_stop + after_resume == uninterrupted


def test_builder_refuses_a_template_without_lines():
    with pytest.raises(UserError, match="no lines"):
        PromptBuilder(template_of(), "fox")
