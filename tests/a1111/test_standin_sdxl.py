"""The stand-in's SDXL is A1111 v1.10.1's (sdxl.md): the conditioning it computes at generation, SDXL
embedding files, the no-grad trap of sgm's conditioner, --medvram-sdxl placement and FP8 storage.

Expected values are computed here from the networks' own parts (open_clip's blocks run by hand, transformers'
hidden states, the sinusoid written out), not through the stand-in's text path.
"""

import math

import open_clip
import pytest
import safetensors.torch
import torch
from tiny_sgm import (
    BIGG_WIDTH,
    CLIP_L_LAYERS,
    CLIP_L_WIDTH,
    CROSSATTN_WIDTH,
    FP8_RUNS_ON_CPU,
    SIZE_EMBEDDING_WIDTH,
    VECTOR_WIDTH,
)

BPE = open_clip.tokenizer._tokenizer
START, END = BPE.encoder["<start_of_text>"], BPE.encoder["<end_of_text>"]


def chunk_ids(prompt: str, pad: int) -> torch.Tensor:
    ids = [START] + BPE.encode(prompt) + [END]
    return torch.tensor([ids + [pad] * (77 - len(ids))])


def clip_l(model):
    return model.conditioner.embedders[0].wrapped


def bigg(model):
    return model.conditioner.embedders[1].wrapped


def expected_clip_l(model, prompt: str) -> torch.Tensor:
    """CLIP-L's hidden state after block layer_idx of its N (the penultimate), no final LayerNorm; padded
    with the end id."""
    transformer = clip_l(model).transformer
    hidden = transformer(input_ids=chunk_ids(prompt, pad=END), output_hidden_states=True).hidden_states
    return hidden[CLIP_L_LAYERS - 1]


def expected_bigg(model, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bigG's input of its last block (no ln_final), and its pooled vector: ln_final of the last block's output
    at the end token, times text_projection; padded with 0."""
    tower = bigg(model).model
    ids = chunk_ids(prompt, pad=0)
    x = (tower.token_embedding.wrapped(ids) + tower.positional_embedding).permute(1, 0, 2)
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    penultimate = x.permute(1, 0, 2)
    last = tower.transformer.resblocks[-1](x, attn_mask=tower.attn_mask).permute(1, 0, 2)
    end_position = (ids[0] == END).nonzero()[0, 0]
    pooled = tower.ln_final(last)[:, end_position] @ tower.text_projection
    return penultimate, pooled


def size_embedding(*numbers: float) -> torch.Tensor:
    """Each number as cos/sin of SIZE_EMBEDDING_WIDTH/2 geometric frequencies (1 .. 1/10000), side by side."""
    half = SIZE_EMBEDDING_WIDTH // 2
    parts = []
    for number in numbers:
        frequencies = [math.exp(-math.log(10000) * i / half) for i in range(half)]
        parts += [math.cos(number * f) for f in frequencies] + [math.sin(number * f) for f in frequencies]
    return torch.tensor([parts])


def conditioning(model, prompt, width=None, height=None, negative=False):
    from modules.prompt_parser import SdConditioning

    with torch.no_grad():
        return model.get_learned_conditioning(
            SdConditioning([prompt], width=width, height=height, is_negative_prompt=negative)
        )


def write_embedding(folder, name, clip_l_rows, clip_g_rows):
    path = folder / f"{name}.safetensors"
    safetensors.torch.save_file(
        {"clip_l": clip_l_rows.contiguous(), "clip_g": clip_g_rows.contiguous()}, path
    )
    return path


def reload_embeddings(webui):
    webui.db.load_textual_inversion_embeddings(force_reload=True)


def token_rows(model, words: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(BPE.encode(words))
    clip_l_table = clip_l(model).transformer.text_model.embeddings.token_embedding.wrapped
    return clip_l_table(ids).detach(), bigg(model).model.token_embedding.wrapped(ids).detach()


# --- loading ------------------------------------------------------------------------------------------------------


def test_sdxl_loads_with_the_webuis_attributes(webui_sdxl):
    import sgm.modules
    from modules import sd_hijack_clip, sd_hijack_open_clip, sd_models, shared

    model = webui_sdxl.model
    assert shared.sd_model is model
    assert (model.is_sdxl, model.is_sd2, model.is_sd1, model.is_ssd) == (True, False, False, False)
    assert model.model_type == sd_models.ModelType.SDXL and model.latent_channels == 4
    assert model.parameterization == "eps" and model.cond_stage_key == "txt"
    assert model.model.conditioning_key == "crossattn"
    assert model.model.diffusion_model.dtype == torch.float32
    # The default scaled-linear schedule (sdxl.md §1 [run]: 0.99915 .. 0.00466).
    assert model.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert model.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=1e-5)
    assert isinstance(model.cond_stage_model, sgm.modules.GeneralConditioner)
    embedders = model.conditioner.embedders
    assert isinstance(embedders[0], sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords)
    assert isinstance(embedders[1], sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords)
    assert [e.input_key for e in embedders] == [
        "txt",
        "txt",
        "original_size_as_tuple",
        "crop_coords_top_left",
        "target_size_as_tuple",
    ]
    assert (embedders[0].return_pooled, embedders[1].return_pooled) == (False, True)
    assert not embedders[0].is_trainable and not embedders[1].is_trainable
    # The embedding database's width and the name lookup go through the conditioner.
    assert model.cond_stage_model.encode_embedding_init_text(",", 1).shape == (1, CROSSATTN_WIDTH)
    assert model.cond_stage_model.tokenize(["a cat"]) == [BPE.encode("a cat")]
    assert model.cond_stage_model.get_target_prompt_token_count(80) == 150
    # "" encoded as a positive prompt, at 1024x1024: not zeroed.
    assert model.cond_stage_model_empty_prompt.shape == (1, 77, CROSSATTN_WIDTH)
    assert model.cond_stage_model_empty_prompt.abs().sum() > 0


def test_unloading_puts_sgms_own_embedders_back(webui_sdxl):
    from modules import sd_hijack_clip, sd_models
    from sgm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2

    model = webui_sdxl.model
    sd_models.unload_model(model)
    try:
        embedders = model.conditioner.embedders
        assert type(embedders[0]) is FrozenCLIPEmbedder and type(embedders[1]) is FrozenOpenCLIPEmbedder2
        assert type(embedders[0].transformer.text_model.embeddings.token_embedding) is torch.nn.Embedding
        assert type(embedders[1].model.token_embedding) is torch.nn.Embedding
        assert not hasattr(model, "cond_stage_model")
    finally:
        sd_models.load_model(model, model.sd_checkpoint_info)
    assert isinstance(model.conditioner.embedders[0], sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords)


def test_first_stage_scales_once_and_get_first_stage_encoding_is_the_identity(webui_sdxl):
    model = webui_sdxl.model
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.manual_seed(0)
    latent = model.encode_first_stage(image)
    torch.manual_seed(0)
    raw = model.first_stage_model.encode(image)  # a posterior sample, a tensor
    assert torch.allclose(latent, 0.13025 * raw)
    assert model.get_first_stage_encoding(latent) is latent
    assert torch.allclose(model.decode_first_stage(latent), model.first_stage_model.decode(raw), atol=1e-5)


# --- the conditioning at generation -------------------------------------------------------------------------------


def test_crossattn_is_clip_l_penultimate_beside_bigg_penultimate(webui_sdxl):
    model, prompt = webui_sdxl.model, "a photo of a red cat"
    cond = conditioning(model, prompt, width=96, height=64)
    assert cond["crossattn"].shape == (1, 77, CROSSATTN_WIDTH)
    expected_l = expected_clip_l(model, prompt)
    penultimate, pooled = expected_bigg(model, prompt)
    assert torch.allclose(cond["crossattn"][..., :CLIP_L_WIDTH], expected_l, atol=1e-5)
    assert torch.allclose(cond["crossattn"][..., CLIP_L_WIDTH:], penultimate, atol=1e-5)
    assert torch.allclose(cond["vector"][:, :BIGG_WIDTH], pooled, atol=1e-5)
    # The layers are the intended ones: CLIP-L's last layer and bigG's ln_final differ from what was taken.
    last_l = clip_l(model).transformer(input_ids=chunk_ids(prompt, END)).last_hidden_state
    assert not torch.allclose(expected_l, last_l, atol=1e-3)
    assert not torch.allclose(penultimate, bigg(model).model.ln_final(penultimate), atol=1e-3)


def test_vector_is_pooled_then_original_crop_and_target_sizes_as_height_width(webui_sdxl, monkeypatch):
    from modules import shared

    monkeypatch.setitem(shared.opts.data, "sdxl_crop_top", 3)
    monkeypatch.setitem(shared.opts.data, "sdxl_crop_left", 5)
    cond = conditioning(webui_sdxl.model, "a cat", width=96, height=64)
    assert cond["vector"].shape == (1, VECTOR_WIDTH)
    assert torch.allclose(cond["vector"][:, BIGG_WIDTH:], size_embedding(64, 96, 3, 5, 64, 96), atol=1e-5)


def test_a_plain_prompt_list_is_conditioned_at_1024_square(webui_sdxl):
    with torch.no_grad():
        cond = webui_sdxl.model.get_learned_conditioning(["a cat"])
    assert torch.allclose(
        cond["vector"][:, BIGG_WIDTH:], size_embedding(1024, 1024, 0, 0, 1024, 1024), atol=1e-5
    )


def test_a_long_prompt_has_two_chunks_and_the_first_chunks_pooled_vector(webui_sdxl):
    model = webui_sdxl.model
    words = " ".join(["cat"] * 100)
    cond = conditioning(model, words, width=64, height=64)
    assert cond["crossattn"].shape == (1, 154, CROSSATTN_WIDTH)
    _, first_chunk_pooled = expected_bigg(model, " ".join(["cat"] * 75))
    assert torch.allclose(cond["vector"][:, :BIGG_WIDTH], first_chunk_pooled, atol=1e-5)


def test_an_empty_negative_prompt_zeroes_the_text_parts_only(webui_sdxl):
    model = webui_sdxl.model
    negative = conditioning(model, "", width=96, height=64, negative=True)
    positive = conditioning(model, "", width=96, height=64)
    assert not negative["crossattn"].any()
    assert not negative["vector"][:, :BIGG_WIDTH].any()
    assert torch.equal(negative["vector"][:, BIGG_WIDTH:], positive["vector"][:, BIGG_WIDTH:])
    assert positive["crossattn"].any() and positive["vector"][:, :BIGG_WIDTH].any()
    # A negative prompt with words is encoded like a prompt.
    worded = conditioning(model, "blurry", width=96, height=64, negative=True)
    assert torch.equal(worded["crossattn"], conditioning(model, "blurry", width=96, height=64)["crossattn"])


def test_clip_skip_sdxl_takes_clip_ls_layer_from_the_end_without_layernorm(webui_sdxl, monkeypatch):
    from modules import shared

    model, prompt = webui_sdxl.model, "a cat"
    monkeypatch.setitem(shared.opts.data, "sdxl_clip_l_skip", True)
    monkeypatch.setitem(shared.opts.data, "CLIP_stop_at_last_layers", 1)
    cond = conditioning(model, prompt)
    hidden = (
        clip_l(model).transformer(input_ids=chunk_ids(prompt, END), output_hidden_states=True).hidden_states
    )
    assert torch.allclose(cond["crossattn"][..., :CLIP_L_WIDTH], hidden[-1], atol=1e-5)
    penultimate, _ = expected_bigg(model, prompt)  # bigG is not affected
    assert torch.allclose(cond["crossattn"][..., CLIP_L_WIDTH:], penultimate, atol=1e-5)


def test_txt2img_runs_on_sdxl_with_the_images_size_in_the_conditioning(webui_sdxl):
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", steps=2, width=128, height=64, seed=1)
    result = processing.process_images(p)
    assert result.images[0].size == (128, 64)
    (prompt, cond), *_ = processing.conditioning_log
    assert prompt == "a cat" and set(cond) == {"crossattn", "vector"}
    assert torch.allclose(cond["vector"][:, BIGG_WIDTH:], size_embedding(64, 128, 0, 0, 64, 128), atol=1e-5)


# --- SDXL embedding files -----------------------------------------------------------------------------------------


def test_an_sdxl_embedding_loads_and_its_vectors_take_the_names_place_in_both_encoders(webui_sdxl):
    model = webui_sdxl.model
    rows_l, rows_g = token_rows(model, "red cat")
    write_embedding(webui_sdxl.embeddings_dir, "xlemb", rows_l, rows_g)
    reload_embeddings(webui_sdxl)
    embedding = webui_sdxl.db.word_embeddings["xlemb"]
    assert (embedding.shape, embedding.vectors) == (CROSSATTN_WIDTH, 2)
    # The vectors of "red cat" in place of the name give the conditioning of the words themselves.
    with_name = conditioning(model, "a photo of xlemb", width=64, height=64)
    with_words = conditioning(model, "a photo of red cat", width=64, height=64)
    for key in ("crossattn", "vector"):
        assert torch.allclose(with_name[key], with_words[key], atol=1e-5)


def test_each_half_of_an_sdxl_embedding_reaches_only_its_encoder(webui_sdxl):
    model, folder = webui_sdxl.model, webui_sdxl.embeddings_dir
    generator = torch.Generator().manual_seed(0)
    rows_l, rows_g = (
        torch.randn(2, CLIP_L_WIDTH, generator=generator),
        torch.randn(2, BIGG_WIDTH, generator=generator),
    )

    def cond_with(clip_l_rows, clip_g_rows):
        write_embedding(folder, "xlemb", clip_l_rows, clip_g_rows)
        reload_embeddings(webui_sdxl)
        return conditioning(model, "a photo of xlemb", width=64, height=64)

    base = cond_with(rows_l, rows_g)
    # Random changes: a constant added to a row would vanish in the next LayerNorm for every other position.
    new_l = cond_with(rows_l + torch.randn(rows_l.shape, generator=generator), rows_g)
    assert not torch.allclose(new_l["crossattn"][..., :CLIP_L_WIDTH], base["crossattn"][..., :CLIP_L_WIDTH])
    assert torch.equal(new_l["crossattn"][..., CLIP_L_WIDTH:], base["crossattn"][..., CLIP_L_WIDTH:])
    assert torch.equal(new_l["vector"], base["vector"])
    new_g = cond_with(rows_l, rows_g + torch.randn(rows_g.shape, generator=generator))
    assert torch.equal(new_g["crossattn"][..., :CLIP_L_WIDTH], base["crossattn"][..., :CLIP_L_WIDTH])
    assert not torch.allclose(new_g["crossattn"][..., CLIP_L_WIDTH:], base["crossattn"][..., CLIP_L_WIDTH:])
    assert not torch.allclose(new_g["vector"][:, :BIGG_WIDTH], base["vector"][:, :BIGG_WIDTH])


def test_an_sdxl_embedding_of_other_widths_is_skipped(webui_sdxl):
    write_embedding(webui_sdxl.embeddings_dir, "wide", torch.zeros(1, CLIP_L_WIDTH), torch.zeros(1, 64))
    reload_embeddings(webui_sdxl)
    assert "wide" not in webui_sdxl.db.word_embeddings
    assert webui_sdxl.db.skipped_embeddings["wide"].shape == CLIP_L_WIDTH + 64


def test_a_single_tensor_as_wide_as_both_loads_but_cannot_be_injected(webui_sdxl):
    # sdxl.md §3: the width test accepts it, then the whole row goes into each 32/48-wide table.
    path = webui_sdxl.embeddings_dir / "flat.safetensors"
    safetensors.torch.save_file({"emb_params": torch.zeros(1, CROSSATTN_WIDTH)}, path)
    reload_embeddings(webui_sdxl)
    assert "flat" in webui_sdxl.db.word_embeddings
    with pytest.raises(RuntimeError):
        conditioning(webui_sdxl.model, "a flat cat")


def test_generation_notes_the_embeddings_hash_once_per_text_encoder(webui_sdxl):
    from modules import processing, sd_hijack

    rows_l, rows_g = token_rows(webui_sdxl.model, "red cat")
    write_embedding(webui_sdxl.embeddings_dir, "xlemb", rows_l, rows_g)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a xlemb", steps=1, width=64, height=64, seed=1)
    processing.process_images(p)
    shorthash = webui_sdxl.db.word_embeddings["xlemb"].shorthash
    assert (
        sd_hijack.model_hijack.extra_generation_params["TI hashes"]
        == f"xlemb: {shorthash}, xlemb: {shorthash}"
    )


# --- the no-grad trap ---------------------------------------------------------------------------------------------


def test_the_conditioner_gives_no_gradient_but_the_two_text_wrappers_do(webui_sdxl):
    from modules.textual_inversion.textual_inversion import Embedding

    model = webui_sdxl.model
    vec = {
        "clip_l": torch.randn(2, CLIP_L_WIDTH, requires_grad=True),
        "clip_g": torch.randn(2, BIGG_WIDTH, requires_grad=True),
    }
    embedding = Embedding(vec, "xlemb")
    embedding.vectors, embedding.shape = 2, CROSSATTN_WIDTH
    webui_sdxl.db.register_embedding(embedding, model)
    prompt = ["a photo of xlemb"]

    with torch.enable_grad():
        cond = model.get_learned_conditioning(prompt)
    assert not cond["crossattn"].requires_grad and not cond["vector"].requires_grad, (
        "sgm runs them under no_grad"
    )

    # What a trainer must do instead: call the two wrappers itself, one after the other.
    clip_l_wrapper, bigg_wrapper = model.conditioner.embedders[:2]
    with torch.enable_grad():
        z_l = clip_l_wrapper(prompt)
        z_g, pooled = bigg_wrapper(prompt)
        (z_l.square().sum() + z_g.square().sum() + pooled.square().sum()).backward()
    assert torch.allclose(torch.cat([z_l, z_g], dim=2), cond["crossattn"], atol=1e-5)
    assert torch.allclose(pooled, cond["vector"][:, :BIGG_WIDTH], atol=1e-5)
    assert vec["clip_l"].grad.abs().sum() > 0 and vec["clip_g"].grad.abs().sum() > 0


# --- --medvram-sdxl and FP8 ---------------------------------------------------------------------------------------


MEDVRAM_SDXL = {"flags": {"medvram_sdxl": True}}
FP8_FOR_SDXL = {"settings": {"fp8_storage": "Enable for SDXL"}}


@pytest.mark.parametrize("fresh_sdxl_webui", [MEDVRAM_SDXL], indirect=True)
def test_medvram_sdxl_moves_conditioner_unet_and_vae_to_the_device_one_at_a_time(
    fresh_sdxl_webui, monkeypatch
):
    from modules import devices, lowvram, shared

    model = fresh_sdxl_webui.model
    assert model.lowvram and not shared.parallel_processing_allowed
    parts = {
        id(model.conditioner): "conditioner",
        id(model.model): "unet",
        id(model.first_stage_model): "vae",
    }
    assert lowvram.module_in_gpu is model.conditioner  # the empty prompt was encoded at load
    # Only the CPU is here: let "ram" be a device name of its own, and record moves instead of making them.
    ram = torch.device("meta")
    monkeypatch.setattr(lowvram, "cpu", ram)
    moves = []

    def record(module, device):
        moves.append((parts.get(id(module), type(module).__name__), "ram" if device == ram else "device"))
        return module

    monkeypatch.setattr(torch.nn.Module, "to", record)
    cond = model.get_learned_conditioning(["a cat"])
    assert moves == []  # already there
    model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond)
    assert moves == [("conditioner", "ram"), ("unet", "device")]
    moves.clear()
    model.decode_first_stage(torch.randn(1, 4, 8, 8))
    assert moves == [("unet", "ram"), ("vae", "device")]
    moves.clear()
    model.get_learned_conditioning(["a cat"])
    assert moves == [("vae", "ram"), ("conditioner", "device")]
    assert devices.device != ram


def test_medvram_sdxl_leaves_other_models_and_sdxl_without_it_alone(webui_sdxl, tiny_sd2, monkeypatch):
    from modules import lowvram, shared

    assert webui_sdxl.model.lowvram is False and not webui_sdxl.model.conditioner._forward_pre_hooks
    monkeypatch.setattr(shared.cmd_opts, "medvram_sdxl", True)
    assert lowvram.is_needed(webui_sdxl.model) and not lowvram.is_needed(tiny_sd2)


@FP8_RUNS_ON_CPU
@pytest.mark.parametrize("fresh_sdxl_webui", [FP8_FOR_SDXL], indirect=True)
def test_fp8_for_sdxl_stores_linear_and_conv_weights_outside_the_vae_and_still_generates(fresh_sdxl_webui):
    from modules import devices, processing

    model = fresh_sdxl_webui.model
    assert devices.fp8
    stored = {
        name: module.weight.dtype
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }
    assert {dtype for name, dtype in stored.items() if name.startswith("first_stage_model.")} == {
        torch.float32
    }
    others = {dtype for name, dtype in stored.items() if not name.startswith("first_stage_model.")}
    assert others == {torch.float8_e4m3fn}
    # Token tables and open_clip's fused in-projection are other module types: left as they were.
    assert bigg(model).model.token_embedding.wrapped.weight.dtype == torch.float32
    assert bigg(model).model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float32
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", steps=2, width=64, height=64, seed=1)
    assert processing.process_images(p).images[0].size == (64, 64)


def test_an_sdxl_pt_with_other_keys_fails_to_load_as_in_a1111(webui_sdxl):
    # A1111 v1.10.1 takes every value of an SDXL dict for a tensor (`v.detach()` on each): a name or step
    # beside clip_l/clip_g breaks the load. A .safetensors header's metadata is not part of the dict.
    rows_l, rows_g = torch.zeros(1, CLIP_L_WIDTH), torch.zeros(1, BIGG_WIDTH)
    from ti_trainer.embeddings.files import torch_save_for_a1111  # archives A1111's safe loader admits

    torch_save_for_a1111(
        {"clip_l": rows_l, "clip_g": rows_g, "name": "extra"}, webui_sdxl.embeddings_dir / "extra.pt"
    )
    torch_save_for_a1111({"clip_l": rows_l, "clip_g": rows_g}, webui_sdxl.embeddings_dir / "plain.pt")
    safetensors.torch.save_file(
        {"clip_l": rows_l, "clip_g": rows_g},
        webui_sdxl.embeddings_dir / "header.safetensors",
        metadata={"name": "header", "step": "5"},
    )
    reload_embeddings(webui_sdxl)
    assert "extra" not in webui_sdxl.db.word_embeddings
    (error,) = webui_sdxl.db.load_errors
    assert "extra.pt" in error and "detach" in error
    assert {"plain", "header"} <= set(webui_sdxl.db.word_embeddings), webui_sdxl.db.load_errors
