"""Prompt -> conditioning with the WebUI's rules (reference/a1111.md §3), and DESIGN invariant 1 on the tiny
model: an embedding holding a word's token vectors conditions exactly like the word.

Expected values come from A1111 v1.10.1's documented behaviour (the doctests of `parse_prompt_attention`, the
chunking rules of `tokenize_line`, the padding of `process_tokens`, the modes of `sd_emphasis`), worked out by
hand for a toy tokenizer whose ids are easy to read: `t12` is token 12, `,` is the comma token.
"""

from __future__ import annotations

import re

import pytest
import torch

from ti_trainer.text.conditioning import (
    CHUNK_LENGTH,
    InjectingTokenEmbedding,
    PromptChunker,
    PromptEncoder,
    TextRules,
    TokenIds,
    injector_installed,
)
from ti_trainer.text.prompt_parser import parse_prompt_attention

START, END, COMMA = 900, 901, 902
SD2 = TokenIds(start=START, end=END, pad=0, comma=COMMA)
SD1 = TokenIds(start=START, end=END, pad=END, comma=COMMA)
_OTHER_IDS: dict[str, int] = {}


def toy_tokenize(texts: list[str]) -> list[list[int]]:
    """`t<n>` -> n, `,` -> COMMA, any other word or character -> a fixed id of its own (from 1000 up)."""

    def token_id(piece: str) -> int:
        if piece == ",":
            return COMMA
        if re.fullmatch(r"t\d+", piece):
            return int(piece[1:])
        return _OTHER_IDS.setdefault(piece, 1000 + len(_OTHER_IDS))

    return [[token_id(piece) for piece in re.findall(r"t\d+|[a-z]+|\S", text.lower())] for text in texts]


def words(count: int, first: int = 1) -> str:
    return " ".join(f"t{i}" for i in range(first, first + count))


def ids(count: int, first: int = 1) -> list[int]:
    return list(range(first, first + count))


def padded(tokens: list[int]) -> list[int]:
    """A chunk as A1111 builds it: start, the tokens, end tokens up to 75, one more end."""
    return [START] + tokens + [END] * (CHUNK_LENGTH - len(tokens)) + [END]


def chunker(ids_: TokenIds = SD2, **rules) -> PromptChunker:
    return PromptChunker(toy_tokenize, ids_, TextRules(**rules))


def chunk_tokens(prompt: str, **rules) -> list[list[int]]:
    chunks, _ = chunker(**rules).chunks(prompt)
    return [chunk.tokens for chunk in chunks]


# --- parse_prompt_attention: A1111's doctests and documented rules ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # the doctests of modules/prompt_parser.py, verbatim results
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ["a ", 1.0],
                ["house", 1.5730000000000004],
                [" ", 1.1],
                ["on", 1.0],
                [" a ", 1.1],
                ["hill", 0.55],
                [", sun, ", 1.1],
                ["sky", 1.4641000000000006],
                [".", 1.1],
            ],
        ),
    ],
)
def test_parse_matches_a1111s_doctests_exactly(text, expected):
    # Exact floats: the weights decide which fragments merge, so they must be computed in A1111's order.
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(a:1.5)", [["a", 1.5]]),
        ("(a: 1.5 )", [["a", 1.5]]),  # v1.10.1 allows spaces around the weight
        ("(a:-1)", [["a", -1.0]]),
        ("(a:.5) b", [["a", 0.5], [" b", 1.0]]),
        ("[a]", [["a", 1 / 1.1]]),
        ("[[a]]", [["a", 1 / 1.1 / 1.1]]),
        ("((a))", [["a", 1.1 * 1.1]]),
        ("((a:2):3)", [["a", 6.0]]),
        ("(a (b:2) c)", [["a ", 1.1], ["b", 2.2], [" c", 1.1]]),
        ("[a (b) c]", [["a ", 1 / 1.1], ["b", 1.0], [" c", 1 / 1.1]]),
        ("(a:1.2", [["a:1.2", 1.1]]),  # no closing bracket: the colon and number are text
        ("a:1.2)", [["a:1.2)", 1.0]]),  # no opening bracket: all text
        ("a ] b )", [["a ] b )", 1.0]]),  # stray closers are text
        ("[unbalanced", [["unbalanced", 1 / 1.1]]),
        ("\\(a\\) \\[b\\]", [["(a) [b]", 1.0]]),
        ("a \\\\ b", [["a \\ b", 1.0]]),
        ("a\\b", [["ab", 1.0]]),  # a lone backslash escapes nothing and vanishes
        ("", [["", 1.0]]),
        ("a:b", [["a:b", 1.0]]),
    ],
)
def test_parse_weights_brackets_and_escapes(text, expected):
    parsed = parse_prompt_attention(text)
    assert [fragment for fragment, _ in parsed] == [fragment for fragment, _ in expected]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in expected], abs=1e-12)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("a  BREAK\nb", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("BREAK a", [["", 1.0], ["BREAK", -1], ["a", 1.0]]),
        ("a BREAK", [["a", 1.0], ["BREAK", -1], ["", 1.0]]),
        ("(a) BREAK b", [["a", 1.1], ["", 1.0], ["BREAK", -1], ["b", 1.0]]),
        ("aBREAKb BREAKING break", [["aBREAKb BREAKING break", 1.0]]),  # only the whole upper-case word
    ],
)
def test_parse_marks_break(text, expected):
    assert parse_prompt_attention(text) == expected


def test_break_inside_brackets_is_weighted_like_text_as_in_a1111():
    """v1.10.1 multiplies the BREAK marker's -1 by the bracket's weight, so it is no longer a break (the encoder
    then tokenizes the word "BREAK"). Our parse must do the same, or captions would condition differently."""
    assert parse_prompt_attention("a (b BREAK c)") == [["a ", 1.0], ["b", 1.1], ["BREAK", -1.1], ["c", 1.1]]
    assert len(chunk_tokens("t1 (t2 BREAK t3)")) == 1
    assert len(chunk_tokens("t1 (t2) BREAK t3")) == 2


# --- chunking (tokenize_line) ----------------------------------------------------------------------------------


def test_a_short_prompt_is_one_77_token_chunk():
    chunks, count = chunker().chunks("t1 t2 t3")
    assert [chunk.tokens for chunk in chunks] == [padded([1, 2, 3])]
    assert chunks[0].multipliers == [1.0] * 77
    assert count == 3


def test_a_prompt_over_75_tokens_gives_two_chunks_with_start_and_end():
    chunks, count = chunker().chunks(words(80))
    assert [chunk.tokens for chunk in chunks] == [padded(ids(75)), padded(ids(5, 76))]
    assert all(len(chunk.tokens) == len(chunk.multipliers) == 77 for chunk in chunks)
    assert count == 80


@pytest.mark.parametrize(
    ("prompt", "count", "target"),
    [
        ("", 0, 75),
        ("t1 t2 t3", 3, 75),
        (words(75), 75, 75),
        (words(76), 76, 150),
        (words(150), 150, 150),
        (words(151), 151, 225),
        ("t1 BREAK t2", 76, 150),  # a break counts the rest of its chunk
        ("t1 BREAK t2 BREAK t3", 151, 225),
        ("t1 (t2:1.5) [t3]", 3, 75),  # brackets and weights are not tokens
        ("t1, t2", 3, 75),
    ],
)
def test_token_counts_like_the_webui_counter(prompt, count, target):
    assert chunker().token_count(prompt) == (count, target)


def test_with_emphasis_none_brackets_are_tokens_and_break_is_a_word():
    plain = chunker(emphasis="None")
    assert plain.token_count("t1 (t2:1.5)") == (8, 75)  # t1 ( t2 : 1 . 5 )
    chunks, _ = plain.chunks("t1 BREAK t2")
    assert len(chunks) == 1 and chunks[0].tokens[1:4] == toy_tokenize(["t1 BREAK t2"])[0]


def test_emphasis_ignore_still_parses_brackets_and_break():
    assert chunker(emphasis="Ignore").token_count("t1 (t2:1.5) BREAK t3") == (76, 150)


def test_break_forces_a_new_chunk():
    assert chunk_tokens("t1 t2 BREAK t3") == [padded([1, 2]), padded([3])]
    assert chunk_tokens("BREAK t1") == [padded([]), padded([1])]
    assert chunk_tokens("t1 BREAK") == [padded([1])]  # nothing after it: no empty chunk


def test_break_after_a_full_chunk_adds_no_empty_chunk_in_between():
    # 75 tokens close the chunk only when a 76th arrives; BREAK closes it instead.
    assert chunk_tokens(words(75) + " BREAK t80") == [padded(ids(75)), padded([80])]


def test_comma_backtracking_moves_the_tail_after_the_last_comma():
    # 70 words, a comma, 10 words: the chunk fills at 75 with 4 words after the comma; those 4 move on.
    prompt = words(70) + " , " + words(10, 71)
    assert chunk_tokens(prompt) == [padded(ids(70) + [COMMA]), padded(ids(10, 71))]
    assert chunker().token_count(prompt) == (85, 150)


def test_comma_backtracking_carries_the_weights_along():
    chunks, _ = chunker().chunks(words(70) + ", (t71 t72:1.5) t73 t74 t75 t76")
    assert chunks[0].multipliers == [1.0] * 77
    assert chunks[1].tokens[1:7] == [71, 72, 73, 74, 75, 76]
    assert chunks[1].multipliers[1:7] == [1.5, 1.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("words_before_comma", "backtrack", "moves"),
    [
        (55, 20, True),  # 20 tokens after the comma when the chunk is full: within the limit
        (54, 20, False),  # 21: too far, the chunk is cut at 75 as usual
        (50, 20, False),
        (70, 0, False),  # 0 turns backtracking off
        (70, 5, True),
        (69, 5, False),
    ],
)
def test_comma_backtracking_only_within_the_limit(words_before_comma, backtrack, moves):
    prompt = words(words_before_comma) + ", " + words(30, words_before_comma + 1)
    first = chunk_tokens(prompt, comma_padding_backtrack=backtrack)[0]
    if moves:
        assert first == padded(ids(words_before_comma) + [COMMA])
    else:
        assert first == [START] + (ids(words_before_comma) + [COMMA] + ids(30, words_before_comma + 1))[
            :75
        ] + [END]


def test_a_comma_as_the_76th_token_does_not_backtrack():
    assert chunk_tokens(words(75) + ", t76") == [padded(ids(75)), padded([COMMA, 76])]


def test_an_embedding_reserves_one_placeholder_per_vector():
    names = chunker()
    names.register("zz", 4)
    chunks, count = names.chunks("t1 (zz:1.3) t2")
    assert chunks[0].tokens == padded([1, 0, 0, 0, 0, 2])
    assert chunks[0].multipliers[1:7] == [1.0, 1.3, 1.3, 1.3, 1.3, 1.0]
    assert chunks[0].fixes == [(1, "zz")]  # offset within the chunk, before the start token
    assert count == 6


def test_an_embedding_that_does_not_fit_starts_a_new_chunk():
    names = chunker()
    names.register("zz", 4)
    chunks, count = names.chunks(words(73) + " zz t80")
    assert [chunk.tokens for chunk in chunks] == [padded(ids(73)), padded([0, 0, 0, 0, 80])]
    assert [chunk.fixes for chunk in chunks] == [[], [(0, "zz")]]
    assert count == 75 + 5


def test_an_embedding_that_just_fits_stays():
    names = chunker()
    names.register("zz", 4)
    chunks, count = names.chunks(words(71) + " zz")
    assert [chunk.tokens for chunk in chunks] == [[START] + ids(71) + [0, 0, 0, 0] + [END]]
    assert chunks[0].fixes == [(71, "zz")]
    assert count == 75


@pytest.mark.parametrize("longer_first", [True, False])
def test_the_longest_registered_name_wins_and_names_match_on_tokens(longer_first):
    names = chunker()
    for name, count in sorted([("t5", 3), ("t5 t6", 2)], key=lambda item: len(item[0]), reverse=longer_first):
        names.register(name, count)
    chunks, _ = names.chunks("t4 T5  t6 t7 t5 t8")  # matching is on token ids: case and spacing do not matter
    assert chunks[0].tokens[1:10] == [4, 0, 0, 7, 0, 0, 0, 8, END]
    assert chunks[0].fixes == [(1, "t5 t6"), (4, "t5")]
    names.unregister("t5 t6")
    assert names.chunks("t5 t6")[0][0].fixes == [(0, "t5")]


# --- padding (process_tokens) and emphasis (sd_emphasis) ------------------------------------------------------


def recording_encoder(ids_: TokenIds = SD2, **rules):
    """A PromptEncoder over a fixed random table: the 'transformer' is the token lookup itself."""
    generator = torch.Generator().manual_seed(0)
    table = torch.nn.Embedding(2000, 6)
    with torch.no_grad():
        table.weight.copy_(torch.rand(2000, 6, generator=generator) + 0.5)  # positive: a non-zero mean
    table.requires_grad_(False)
    injector = InjectingTokenEmbedding(table)
    seen: list[list[list[int]]] = []

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.tolist())
        return injector(tokens)

    return PromptEncoder(chunker(ids_, **rules), injector, encode), table, seen


def test_sd2_pads_with_zero_after_the_first_end_token():
    encoder, _, seen = recording_encoder(SD2)
    encoder([words(80)], {})
    assert seen == [[[START] + ids(75) + [END]], [[START] + ids(5, 76) + [END] + [0] * 70]]


def test_sd1_pads_with_the_end_token():
    encoder, _, seen = recording_encoder(SD1)
    encoder(["t1 t2"], {})
    assert seen == [[[START, 1, 2] + [END] * 74]]


def test_several_prompts_of_different_lengths_share_a_chunk_count():
    encoder, _, seen = recording_encoder(SD2)
    out = encoder([words(80), "t1"], {})
    assert out.shape == (2, 154, 6)
    assert seen[1][1] == [START, END] + [0] * 75  # the short prompt's missing chunk is an empty chunk


def test_sd2_padding_leaves_embedding_placeholders_before_the_end_alone():
    encoder, _, seen = recording_encoder(SD2)
    encoder.chunker.register("zz", 2)
    encoder(["t1 zz t2"], {"zz": torch.zeros(2, 6)})
    assert seen == [[[START, 1, 0, 0, 2, END] + [0] * 71]]


WEIGHTED = "t1 (t2:1.5) [t3] t4"
MULTIPLIERS = [1.0, 1.0, 1.5, 1 / 1.1, 1.0] + [1.0] * 72


def lookup(table: torch.nn.Embedding, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return table(torch.tensor([tokens]))


def test_original_emphasis_scales_each_token_then_restores_the_mean():
    encoder, table, seen = recording_encoder()
    out = encoder([WEIGHTED], {})
    z = lookup(table, seen[0][0])
    scaled = z * torch.tensor(MULTIPLIERS).view(1, 77, 1)
    assert torch.allclose(out, scaled * (z.mean() / scaled.mean()), atol=1e-6)
    assert torch.allclose(out.mean(), z.mean(), atol=1e-6)
    assert not torch.allclose(out, scaled, atol=1e-3)


def test_no_norm_emphasis_only_scales():
    encoder, table, seen = recording_encoder(emphasis="No norm")
    out = encoder([WEIGHTED], {})
    z = lookup(table, seen[0][0])
    assert torch.allclose(out, z * torch.tensor(MULTIPLIERS).view(1, 77, 1), atol=1e-6)


def test_ignore_emphasis_drops_the_weights_but_not_the_brackets():
    encoder, table, seen = recording_encoder(emphasis="Ignore")
    out = encoder([WEIGHTED], {})
    assert seen[0][0][:6] == [START, 1, 2, 3, 4, END]
    assert torch.allclose(out, lookup(table, seen[0][0]), atol=1e-6)


def test_none_emphasis_keeps_brackets_as_text_and_does_not_scale():
    encoder, table, seen = recording_encoder(emphasis="None")
    out = encoder([WEIGHTED], {})
    assert seen[0][0][1 : 1 + len(toy_tokenize([WEIGHTED])[0])] == toy_tokenize([WEIGHTED])[0]
    assert torch.allclose(out, lookup(table, seen[0][0]), atol=1e-6)


def test_an_unknown_emphasis_name_acts_as_original():
    original, _, _ = recording_encoder()
    unknown, _, _ = recording_encoder(emphasis="Fancy")
    assert torch.allclose(original([WEIGHTED], {}), unknown([WEIGHTED], {}), atol=1e-6)


def test_original_emphasis_restores_the_mean_of_the_whole_batch_as_in_a1111():
    encoder, table, seen = recording_encoder()
    out = encoder([WEIGHTED, "t5 t6"], {})
    z = lookup(table, seen[0][0]).squeeze(0), lookup(table, seen[0][1]).squeeze(0)
    z = torch.stack(z)
    multipliers = torch.stack([torch.tensor(MULTIPLIERS), torch.ones(77)]).unsqueeze(-1)
    scaled = z * multipliers
    assert torch.allclose(out, scaled * (z.mean() / scaled.mean()), atol=1e-6)


# --- injection (EmbeddingsWithFixes) ---------------------------------------------------------------------------


def test_injection_replaces_the_placeholder_rows_after_the_start_token():
    table = torch.nn.Embedding(10, 3)
    injector = InjectingTokenEmbedding(table)
    vectors = torch.full((2, 3), 7.0)
    tokens = torch.tensor([[8, 1, 0, 0, 2, 9], [8, 0, 0, 9, 9, 9]])
    injector.fixes = [[(1, vectors)], [(0, vectors)]]
    out = injector(tokens)
    expected = table(tokens).detach().clone()
    expected[0, 2:4] = 7.0
    expected[1, 1:3] = 7.0
    assert torch.equal(out.detach(), expected)
    assert injector.fixes is None  # used once, like hijack.fixes
    assert torch.equal(injector(tokens), table(tokens))


def test_injection_past_the_end_of_the_row_is_cut_off():
    table = torch.nn.Embedding(10, 3)
    injector = InjectingTokenEmbedding(table)
    injector.fixes = [[(3, torch.full((4, 3), 7.0))]]
    out = injector(torch.tensor([[8, 1, 2, 3, 0, 0]]))
    assert out.shape == (1, 6, 3)
    assert torch.equal(out[0, 4:].detach(), torch.full((2, 3), 7.0))


def test_the_injector_is_installed_only_for_the_block_and_the_original_put_back():
    owner = torch.nn.Module()
    owner.token_embedding = torch.nn.Embedding(10, 3)
    original = owner.token_embedding
    injector = InjectingTokenEmbedding(original)
    with pytest.raises(RuntimeError), injector_installed(injector, owner, "token_embedding") as wrapper:
        assert owner.token_embedding is wrapper is injector and wrapper.weight is original.weight
        raise RuntimeError("a failing step")
    assert owner.token_embedding is original


# --- DESIGN invariant 1 on the real tiny model --------------------------------------------------------------


NAME = "xyzzy"  # not a word of the tiny vocabulary: five tokens of its own


@pytest.fixture(scope="module")
def tiny():
    from ti_trainer.backends.tiny import tiny_backend

    return tiny_backend()


@pytest.fixture
def encoder(tiny):
    yield tiny.prompt_encoder
    tiny.prompt_encoder.chunker.unregister(NAME)


def conditioning_of(encoder: PromptEncoder, prompts: list[str], vectors: torch.Tensor | None = None):
    if vectors is not None:
        encoder.chunker.register(NAME, vectors.shape[0])
    with torch.no_grad():
        return encoder(prompts, {} if vectors is None else {NAME: vectors})


def test_the_tiny_model_is_sd2_shaped(tiny):
    assert isinstance(tiny.prompt_encoder, PromptEncoder)
    ids_ = tiny.prompt_encoder.chunker.ids
    assert ids_.pad == 0 and ids_.end != ids_.pad
    assert len(tiny.tokenize([NAME])[0]) > 1 and len(tiny.tokenize(["painting"])[0]) == 1


@pytest.mark.parametrize(
    ("word", "template"),
    [
        ("painting", "a {} of a cat"),
        ("painting", "a ({}:1.3) of a cat"),
        ("painting", "[[{}]], red sky, (blue:0.8)"),
        ("painting", "{}"),
        ("sunflower", "a {} in a field"),  # one word, four tokens
        ("watercolor landscape", "a {}, soft light"),  # two words
        ("sunflower", "(a ({}:1.4) in a [field])"),
    ],
)
def test_an_embedding_of_a_words_vectors_conditions_like_the_word(encoder, tiny, word, template):
    vectors = tiny.token_vectors(word)
    expected = conditioning_of(encoder, [template.format(word)])
    found = conditioning_of(encoder, [template.format(NAME)], vectors)
    assert found.shape == expected.shape == (1, 77, tiny.text_width)
    assert torch.allclose(found, expected, atol=1e-6)
    # Not by accident: other vectors give other conditioning.
    assert not torch.allclose(conditioning_of(encoder, [template.format(NAME)], vectors + 0.5), expected)


def test_the_equality_holds_in_the_second_chunk(encoder, tiny):
    filler = "red green blue yellow " * 20  # 80 tokens
    vectors = tiny.token_vectors("sunflower")
    expected = conditioning_of(encoder, [filler + "a (sunflower:1.2) in a field"])
    found = conditioning_of(encoder, [filler + f"a ({NAME}:1.2) in a field"], vectors)
    assert found.shape == expected.shape == (1, 154, tiny.text_width)
    assert torch.allclose(found, expected, atol=1e-6)


def test_the_equality_holds_across_a_batch(encoder, tiny):
    vectors = tiny.token_vectors("painting")
    expected = conditioning_of(encoder, ["a (painting:1.3)", "a cat BREAK a dog"])
    found = conditioning_of(encoder, [f"a ({NAME}:1.3)", "a cat BREAK a dog"], vectors)
    assert found.shape == (2, 154, tiny.text_width)
    assert torch.allclose(found, expected, atol=1e-6)


def test_only_the_injected_vectors_get_a_gradient(encoder, tiny):
    vectors = tiny.token_vectors("sunflower").clone().requires_grad_(True)
    encoder.chunker.register(NAME, vectors.shape[0])
    cond = encoder([f"a ({NAME}:1.2) in a field", f"{NAME}, red sky"], {NAME: vectors})
    weights = torch.randn(cond.shape, generator=torch.Generator().manual_seed(0))
    (cond * weights).sum().backward()

    assert vectors.grad is not None and torch.isfinite(vectors.grad).all()
    assert (vectors.grad.abs().sum(dim=1) > 0).all()  # every vector learns
    parameters = list(tiny.text_encoder.parameters())
    assert parameters and all(not p.requires_grad and p.grad is None for p in parameters)
    assert tiny.prompt_encoder.injector.fixes is None


def test_a_prompt_without_the_name_does_not_touch_the_vectors(encoder, tiny):
    vectors = tiny.token_vectors("painting").clone().requires_grad_(True)
    encoder.chunker.register(NAME, 1)
    cond = encoder(["a painting of a cat"], {NAME: vectors})
    assert not cond.requires_grad
    assert encoder.count_injections("a painting of a cat", NAME) == 0
    assert encoder.count_injections(f"a {NAME.upper()}, and {NAME}", NAME) == 2
