"""The host backend over the WebUI's loaded ldm model: conditioning equal to the WebUI's generation-time
conditioning (DESIGN invariant 1), the model's own latents, UNet, schedule and parameterization, and the model
given back exactly as found (invariant 2)."""

import numpy as np
import pytest
import torch
from model_state import assert_same_fingerprint, model_fingerprint

from ti_trainer.analysis.norms import ordinary_token_norms, token_norm_range
from ti_trainer.backends.contract import CLIP_H, CLIP_L, Backend, PreviewRequest, sd_family
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import save_embedding
from ti_trainer.errors import UserError
from ti_trainer.host import a1111

NAME = "myemb"
LONG = ", ".join(
    f"{colour} {thing}" for colour in ("red", "blue", "green") for thing in ("car", "house", "tree")
)
PROMPTS = [
    f"a photo of {NAME}",
    f"a (painting:1.3) by [{NAME}], ((oil)) on canvas",
    f"{NAME} BREAK a red car",
    f"{NAME}, {NAME}",
    "",
    "a (BREAK in brackets) and \\(escaped\\)",
    # Past one chunk (75 tokens): the embedding does not fit at the end and starts the next chunk; the words
    # after the last comma move to the next chunk (comma back-tracking); a long prompt with both.
    "red " * 73 + f"{NAME} car",
    "red " * 60 + ", blue car" * 5 + f" {NAME}",
    f"{LONG}, {LONG}, {LONG}, {NAME}, {LONG}, {LONG} {NAME}",
]


@pytest.fixture
def registered(webui):
    """A 3-vector embedding in the WebUI's folder, loaded by its database, and the same vectors for us."""
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    save_embedding(Embedding(NAME, vectors), webui.embeddings_dir / f"{NAME}.pt")
    a1111.refresh_embeddings()
    assert NAME in webui.db.word_embeddings
    backend = a1111.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 3)
    return backend, {NAME: vectors}


def webui_conditioning(prompts):
    from modules import shared

    with torch.no_grad():
        return shared.sd_model.cond_stage_model(prompts)


@pytest.mark.parametrize("emphasis", ["Original", "No norm", "Ignore", "None"])
def test_conditioning_equals_the_webuis_for_every_prompt(registered, emphasis):
    from modules import shared

    shared.opts.emphasis = emphasis
    backend, vectors = registered
    backend = a1111.get_backend()  # reads the options again
    backend.prompt_encoder.chunker.register(NAME, 3)
    for prompt in PROMPTS:
        expected = webui_conditioning([prompt])
        with torch.no_grad():
            ours = backend.prompt_encoder([prompt], vectors)
        assert ours.shape == expected.shape, prompt
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6, msg=f"prompt {prompt!r}")


def test_conditioning_equals_the_webuis_for_a_batch_of_unequal_lengths(registered):
    backend, vectors = registered
    with torch.no_grad():
        ours = backend.prompt_encoder(PROMPTS, vectors)
    torch.testing.assert_close(ours, webui_conditioning(PROMPTS), rtol=1e-6, atol=1e-6)
    assert ours.shape[1] == 77 * 2


def test_the_prompts_reach_the_chunking_rules_they_are_meant_to(registered):
    """Guards the test prompts above: the boundary cases must stay covered if the prompts are edited."""
    from modules import shared

    wrapper = shared.sd_model.cond_stage_model

    def layout(prompt):
        chunks, _ = wrapper.tokenize_line(prompt)
        return [
            (sum(t != wrapper.id_end for t in c.tokens[1:-1]), [f.offset for f in c.fixes]) for c in chunks
        ]

    assert layout(PROMPTS[-3]) == [(73, []), (4, [0])]  # the 3 vectors did not fit after 73 tokens
    assert layout(PROMPTS[-2])[0][0] < 75 and layout(PROMPTS[-2])[1][1] == [2]  # "blue car" moved on


def test_comma_backtracking_follows_the_webuis_setting(registered):
    from modules import shared

    shared.opts.comma_padding_backtrack = 0
    backend = a1111.get_backend()
    backend.prompt_encoder.chunker.register(NAME, 3)
    prompt = PROMPTS[-1]
    with torch.no_grad():
        torch.testing.assert_close(
            backend.prompt_encoder([prompt], registered[1]),
            webui_conditioning([prompt]),
            rtol=1e-6,
            atol=1e-6,
        )


def test_a_words_token_vectors_injected_give_the_words_conditioning(webui):
    """Invariant 1 as DESIGN states it: 'trained' vectors equal to a word's tokens = writing the word."""
    backend = a1111.get_backend()
    word_vectors = backend.token_vectors("castle")
    backend.prompt_encoder.chunker.register("zqxj", word_vectors.shape[0])
    with torch.no_grad():
        ours = backend.prompt_encoder(["a (zqxj:1.2) on a hill"], {"zqxj": word_vectors})
    torch.testing.assert_close(ours, webui_conditioning(["a (castle:1.2) on a hill"]), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours, webui_conditioning(["a (house:1.2) on a hill"]))


def test_token_vectors_are_the_webuis_init_text_embedding(webui):
    from modules import shared

    expected = shared.sd_model.cond_stage_model.encode_embedding_init_text("a red castle", 3)
    torch.testing.assert_close(a1111.get_backend().token_vectors("a red castle"), expected.float())


def test_schedule_parameterization_latents_and_prediction_are_the_models(webui):
    model = webui.model
    backend = a1111.get_backend()
    assert backend.schedule.parameterization == "v"
    torch.testing.assert_close(backend.schedule.alphas_cumprod, model.alphas_cumprod.double())
    assert backend.text_width == 32
    assert backend.model_hash == "a3b1c2d4e5" and backend.model_name == "tiny-sd2-768-v"

    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = backend.encode_images(pixels)
    dist = model.encode_first_stage(pixels)
    torch.testing.assert_close(latents.mean, dist.mean * model.scale_factor)
    torch.testing.assert_close(latents.std, dist.std * model.scale_factor)

    noisy, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), webui_conditioning(["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(backend.predict(noisy, t, cond), model.apply_model(noisy, t, cond))


def test_a_512_base_model_gives_the_eps_schedule(webui):
    import tiny_ldm

    model = tiny_ldm.build_tiny_sd2("eps")
    model.cond_stage_model = webui.model.cond_stage_model  # the hijacked text encoder of the loaded model
    assert a1111.LdmBackend(model, "cpu").schedule.parameterization == "eps"


def test_the_schedule_is_the_trained_one_when_the_webui_rescales_it_for_sampling(webui):
    original = webui.model.alphas_cumprod
    webui.model.alphas_cumprod = original.clone().fill_(0.5)  # e.g. the "Zero terminal SNR" option
    try:
        torch.testing.assert_close(a1111.get_backend().schedule.alphas_cumprod, original.double())
    finally:
        webui.model.alphas_cumprod = original


def test_only_the_embedding_gets_a_gradient_and_the_model_is_given_back(registered, webui):
    backend, vectors = registered
    before = model_fingerprint(webui.model)
    assert any(before["requires_grad"].values()), "the WebUI leaves its UNet trainable; the test needs that"
    trainable = vectors[NAME].clone().requires_grad_(True)
    with backend.training_session():
        assert not any(p.requires_grad for p in webui.model.parameters())
        cond = backend.prompt_encoder([f"a photo of {NAME}"], {NAME: trainable})
        prediction = backend.predict(torch.randn(1, 4, 8, 8), torch.tensor([500]), cond)
        prediction.pow(2).mean().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0
    assert_same_fingerprint(before, model_fingerprint(webui.model))


def test_the_session_gives_the_model_back_after_an_error(webui):
    backend = a1111.get_backend()
    before = model_fingerprint(webui.model)
    with pytest.raises(RuntimeError, match="boom"), backend.training_session():
        with backend.training_session():  # re-entered, e.g. by a preview inside a run
            pass
        assert not any(p.requires_grad for p in webui.model.parameters())
        raise RuntimeError("boom")
    assert_same_fingerprint(before, model_fingerprint(webui.model))


def test_encoding_outside_a_session_leaves_the_model_as_it_was(registered, webui):
    backend, vectors = registered
    before = model_fingerprint(webui.model)
    with torch.no_grad():
        backend.prompt_encoder([f"a photo of {NAME}"], vectors)
    backend.encode_images(torch.zeros(1, 3, 64, 64))
    assert_same_fingerprint(before, model_fingerprint(webui.model))


def test_models_it_cannot_train_are_refused_with_a_message(webui):
    model = webui.model
    model.model.conditioning_key = "hybrid"
    try:
        with pytest.raises(UserError, match="inpainting"):
            a1111.get_backend()
    finally:
        model.model.conditioning_key = "crossattn"
    model.conditioner = object()
    try:
        with pytest.raises(UserError, match="SDXL"):
            a1111.get_backend()
    finally:
        del model.conditioner


@pytest.mark.parametrize("flag", ["medvram", "lowvram"])
def test_low_vram_modes_train_with_placement_taken_over(webui, monkeypatch, flag):
    from modules import shared

    monkeypatch.setattr(shared.cmd_opts, flag, True)
    assert a1111.get_backend().low_vram
    monkeypatch.setattr(shared.cmd_opts, flag, False)
    assert not a1111.get_backend().low_vram


def test_no_model_is_a_clear_message(webui, monkeypatch):
    from modules import shared

    monkeypatch.setattr(shared, "sd_model", None)
    with pytest.raises(UserError, match="No Stable Diffusion model"):
        a1111.get_backend()


@pytest.fixture
def sd1_webui(webui, tmp_path):
    """The same WebUI with an SD 1.x text encoder (CLIP) loaded in place of the OpenCLIP one."""
    import tiny_ldm
    from modules import sd_models

    model, checkpoint = webui.model, webui.model.sd_checkpoint_info
    sd_models.unload_model(model)
    open_clip_encoder = model.cond_stage_model
    model.cond_stage_model = tiny_ldm.tiny_sd1_text_encoder(tmp_path)
    sd_models.load_model(model, checkpoint)
    yield webui
    sd_models.unload_model(model)
    model.cond_stage_model = open_clip_encoder
    sd_models.load_model(model, checkpoint)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_conditioning_equals_the_webuis_with_its_clip_skip(sd1_webui, clip_skip):
    from modules import shared

    shared.opts.CLIP_stop_at_last_layers = clip_skip
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    save_embedding(Embedding(NAME, vectors), sd1_webui.embeddings_dir / f"{NAME}.pt")
    a1111.refresh_embeddings()
    assert NAME in sd1_webui.db.word_embeddings
    backend = a1111.get_backend()
    assert (
        backend.prompt_encoder.chunker.ids.pad == backend.prompt_encoder.chunker.ids.end
    )  # SD 1.x pads with end
    backend.prompt_encoder.chunker.register(NAME, 3)
    with torch.no_grad():
        ours = {prompt: backend.prompt_encoder([prompt], {NAME: vectors}) for prompt in PROMPTS}
    for prompt, conditioning in ours.items():
        torch.testing.assert_close(conditioning, webui_conditioning([prompt]), rtol=1e-6, atol=1e-6)
    if clip_skip == 2:  # the option changes the result, so the equality above is not vacuous
        shared.opts.CLIP_stop_at_last_layers = 1
        assert not torch.allclose(webui_conditioning([PROMPTS[0]]), ours[PROMPTS[0]])


# --- the backend contract (backends/contract.py) -------------------------------------------------------------


def plain_token_embedding(layer: torch.nn.Module) -> torch.nn.Embedding:
    """The nn.Embedding under the WebUI's EmbeddingsWithFixes (if it wrapped this layer)."""
    while not isinstance(layer, torch.nn.Embedding):
        layer = layer.wrapped
    return layer


def test_the_backend_fills_the_whole_contract(webui):
    backend = a1111.get_backend()
    assert isinstance(backend, Backend)
    # The tiny model: OpenCLIP of width 32, a 4-channel VAE with four resolutions (8x, as in SD).
    assert backend.family == sd_family("sd2", 32, latent_channels=4, vae_scale_factor=8)
    assert backend.family.text_encoders[0].key == CLIP_H
    request = PreviewRequest("a cat", "", 2, 7.0, 1, 64, 64, "Euler a", {})
    assert backend.render(request) is None  # previews are the WebUI's txt2img's


def test_the_overbake_range_is_read_from_the_open_clip_token_embedding(webui):
    """The "ordinary words" range is the token-embedding matrix's on this host too (it used to come from a
    word list here and from the whole matrix standalone), and the same matrix gives the same range on the
    diffusers backend."""
    from modules import shared

    from ti_trainer.backends.tiny import tiny_backend

    backend = a1111.get_backend()
    open_clip = shared.sd_model.cond_stage_model.wrapped  # FrozenOpenCLIPEmbedder
    matrix = plain_token_embedding(open_clip.model.token_embedding).weight
    found = ordinary_token_norms(backend)
    assert found == token_norm_range(matrix)
    assert found.source == f"all {matrix.shape[0]} tokens"
    norms = np.linalg.norm(matrix.detach().float().numpy().astype(np.float64), axis=1)
    assert (found.low, found.median, found.high) == pytest.approx(
        tuple(np.quantile(norms, [0.01, 0.5, 0.99]))
    )

    standalone = tiny_backend("v")
    standalone.text_encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(matrix.detach().clone()))
    assert ordinary_token_norms(standalone) == found


def test_sd1_is_its_own_family_with_clips_token_embedding(sd1_webui):
    from modules import shared

    backend = a1111.get_backend()
    assert isinstance(backend, Backend)
    assert backend.family.name == "sd1" and backend.family.text_encoders[0].key == CLIP_L
    clip = shared.sd_model.cond_stage_model.wrapped  # FrozenCLIPEmbedder
    matrix = plain_token_embedding(clip.transformer.text_model.embeddings.token_embedding).weight
    assert backend.token_embedding_weight(CLIP_L) is matrix
    assert ordinary_token_norms(backend) == token_norm_range(matrix)
