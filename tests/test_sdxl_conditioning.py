"""SDXL conditioning as the WebUI computes it (reference/sdxl.md §2), on the tiny SDXL model.

The reference here is written out from the facts, independently of text/multi_encoder.py: each encoder runs
on its own padded tokens (CLIP-L pads with the end token, bigG with 0 after the first end token), CLIP-L's
hidden_states[-2] and bigG's hidden_states[-2] are concatenated in that order, bigG's projected pooled output
of the first chunk goes to the vector input, and the size conditioning is (h, w, 0, 0, h, w).
"""

from __future__ import annotations

import pytest
import torch

from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.backends.tiny_xl import tiny_xl_backend
from ti_trainer.text.conditioning import CHUNK_LENGTH
from ti_trainer.text.multi_encoder import TextConditioning

NAME = "xyzzy"


@pytest.fixture(scope="module")
def backend():
    return tiny_xl_backend()


def reference_conditioning(backend, prompt_ids: list[int]) -> TextConditioning:
    """One chunk, no emphasis, straight from the transformers models."""
    ids = backend.prompt_encoder.chunker.ids
    row = [ids.start, *prompt_ids, ids.end]
    clip_l_row = row + [ids.end] * (CHUNK_LENGTH + 2 - len(row))
    clip_g_row = row + [0] * (CHUNK_LENGTH + 2 - len(row))
    with torch.no_grad():
        clip_l = backend.text_encoder(input_ids=torch.tensor([clip_l_row]), output_hidden_states=True)
        clip_g = backend.text_encoder_2(input_ids=torch.tensor([clip_g_row]), output_hidden_states=True)
    return TextConditioning(
        torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1), clip_g.text_embeds
    )


def encode(backend, prompt: str, vectors: dict | None = None) -> TextConditioning:
    with torch.no_grad():
        return backend.prompt_encoder([prompt], vectors or {})


def assert_same(a: TextConditioning, b: TextConditioning, atol: float = 1e-6) -> None:
    assert a.hidden.shape == b.hidden.shape and a.pooled.shape == b.pooled.shape
    assert torch.allclose(a.hidden, b.hidden, atol=atol) and torch.allclose(a.pooled, b.pooled, atol=atol)


def test_the_text_path_is_the_webuis(backend):
    prompt = "a red square, simple shapes"
    expected = reference_conditioning(backend, backend.tokenize([prompt])[0])
    found = encode(backend, prompt)
    assert found.hidden.shape == (1, 77, 32 + 48) and found.pooled.shape == (1, 48)
    assert_same(found, expected)


def test_injecting_a_words_vectors_per_encoder_equals_writing_the_word(backend):
    """The parity test with its negative controls: the embedding's clip_l rows go to CLIP-L and its clip_g
    rows to bigG; a wrong word, or one encoder's rows taken from another word, gives another conditioning."""
    backend.prompt_encoder.chunker.register(NAME, 2)
    written = encode(backend, "a red painting of a tree")
    word = backend.token_vectors("red painting")
    assert {key: value.shape[0] for key, value in word.items()} == {"clip_l": 2, "clip_g": 2}
    assert_same(encode(backend, f"a {NAME} of a tree", {NAME: word}), written)

    other = backend.token_vectors("blue circle")
    wrong_word = encode(backend, f"a {NAME} of a tree", {NAME: other})
    assert not torch.allclose(wrong_word.hidden, written.hidden, atol=1e-4)
    for key in ("clip_l", "clip_g"):
        mixed = encode(backend, f"a {NAME} of a tree", {NAME: {**word, key: other[key]}})
        assert not torch.allclose(mixed.hidden, written.hidden, atol=1e-4), f"{key} was not used"
    only_clip_l_wrong = encode(backend, f"a {NAME} of a tree", {NAME: {**word, "clip_l": other["clip_l"]}})
    # CLIP-L does not feed the pooled vector; bigG does.
    assert torch.allclose(only_clip_l_wrong.pooled, written.pooled, atol=1e-6)
    assert not torch.allclose(only_clip_l_wrong.hidden[..., :32], written.hidden[..., :32], atol=1e-4)
    assert torch.allclose(only_clip_l_wrong.hidden[..., 32:], written.hidden[..., 32:], atol=1e-6)


def test_long_prompts_concatenate_chunks_and_pool_the_first_only(backend):
    first = "red square, " * 20
    prompt = f"{first} BREAK blue circle"
    found = encode(backend, prompt)
    assert found.hidden.shape[1] == 2 * 77
    alone = encode(backend, first)
    assert torch.allclose(found.hidden[:, :77], alone.hidden, atol=1e-6)
    assert torch.allclose(found.pooled, alone.pooled, atol=1e-6)
    assert torch.allclose(found.hidden[:, 77:], encode(backend, "blue circle").hidden, atol=1e-6)


def test_emphasis_weights_each_encoders_hidden_states_on_its_own_and_not_the_pooled(backend):
    plain = encode(backend, "red square")
    weighted = encode(backend, "(red:1.5) square")
    assert torch.allclose(weighted.pooled, plain.pooled, atol=1e-6)
    for part in (slice(0, 32), slice(32, 80)):  # A1111's mean-preserving rescale, per encoder
        assert torch.allclose(weighted.hidden[..., part].mean(), plain.hidden[..., part].mean(), atol=1e-5)
        assert not torch.allclose(weighted.hidden[..., part], plain.hidden[..., part], atol=1e-4)


def test_predict_conditions_on_the_latents_size(backend):
    seen = []
    real_forward = backend.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return real_forward(*args, **kwargs)

    cond = encode(backend, "red square")
    generator = torch.Generator().manual_seed(0)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(backend.unet, "forward", spy)
        wide = backend.predict(torch.randn(1, 4, 8, 16, generator=generator), torch.tensor([500]), cond)
    assert seen[0].tolist() == [[64, 128, 0, 0, 64, 128]]  # (h, w) in pixels: 8x16 latents, 8 px each
    # The vector input matters: the same latents with another size's numbers predict something else.
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(
            "ti_trainer.backends.diffusers_xl_backend.size_conditioning",
            lambda h, w: (1024, 1024, 0, 0, 1024, 1024),
        )
        other = backend.predict(
            torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500]), cond
        )
    assert not torch.allclose(wide, other, atol=1e-5)


def test_an_empty_negative_prompt_is_zeros_as_in_the_webui(backend):
    def request(negative: str) -> PreviewRequest:
        return PreviewRequest("red square", negative, 2, 5.0, 1, 64, 64, "Euler", {})

    with torch.no_grad():
        empty = backend.negative_conditioning(request(""))
        written = backend.negative_conditioning(request("blurry"))
    assert not empty.hidden.any() and not empty.pooled.any()
    assert_same(written, encode(backend, "blurry"))


def test_a_preview_renders_at_the_requested_size(backend):
    backend.prompt_encoder.chunker.register(NAME, 2)
    vectors = {NAME: backend.token_vectors("red painting")}
    image = backend.render(PreviewRequest(f"a {NAME}", "", 2, 5.0, 1, 64, 48, "Euler a", vectors))
    assert image.size == (64, 48)
