"""SDXL embedding files: what we write loads in A1111 (its v1.10.1 loader logic), ComfyUI and diffusers, and
every SDXL form those tools write loads here; files of the other family are refused with a clear message."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ti_trainer.backends.contract import sd_family, sdxl_family
from ti_trainer.embeddings.checks import require_fits
from ti_trainer.embeddings.embedding import Embedding, vectors_checksum
from ti_trainer.embeddings.files import (
    embedding_to_dict,
    load_embedding,
    load_optimizer_state,
    save_embedding,
    save_optimizer_state,
)
from ti_trainer.embeddings.png import extract_embedding_data, save_image_with_embedding
from ti_trainer.errors import UserError


def xl_vectors(rows: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "clip_l": torch.randn(rows, 768, generator=generator),
        "clip_g": torch.randn(rows, 1280, generator=generator),
    }


def xl_embedding(step: int = 40) -> Embedding:
    return Embedding("xlemb", xl_vectors(), step, "abc123", "sd_xl_base_1.0")


def a1111_load_from_data(data: dict) -> tuple[dict, int, int]:
    """A1111 v1.10.1's SDXL branch of `load_from_data` (textual_inversion.py L296-299), as it is: every value
    of the dict is taken for a tensor. Returns (vec, shape, vectors)."""
    if type(data) == dict and "clip_g" in data and "clip_l" in data:  # noqa: E721 (A1111's own test)
        vec = {k: v.detach().to("cpu", dtype=torch.float32) for k, v in data.items()}
        shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
        vectors = data["clip_g"].shape[0]
        return vec, shape, vectors
    raise AssertionError("A1111 would not take this for an SDXL embedding")


def assert_a1111_loads(data: dict, expected: dict[str, torch.Tensor]) -> None:
    vec, shape, vectors = a1111_load_from_data(data)
    assert (shape, vectors) == (2048, 2)  # registered only when shape equals the model's 768 + 1280
    for key in ("clip_l", "clip_g"):  # each EmbeddingsWithFixes takes vec[its key]
        assert torch.equal(vec[key], expected[key])


def test_safetensors_holds_clip_l_and_clip_g_with_the_step_in_its_header(tmp_path):
    embedding = xl_embedding()
    path = save_embedding(embedding, tmp_path / "xlemb.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["clip_g", "clip_l"]  # noqa: SIM118
        metadata = handle.metadata()
    assert metadata["step"] == "40" and metadata["sd_checkpoint"] == "abc123"
    loaded = load_embedding(path)
    assert loaded.per_encoder and loaded.step == 40 and loaded.num_vectors == 2 and loaded.width == 2048
    for key in ("clip_l", "clip_g"):
        assert torch.equal(loaded.vectors[key], embedding.vectors[key])
    # A1111 reads a .safetensors with safetensors.torch.load_file: tensors only, metadata left aside.
    assert_a1111_loads(load_file(str(path)), embedding.vectors)


def test_the_pt_holds_the_two_tensors_alone_because_a1111_takes_every_value_for_a_tensor(tmp_path):
    embedding = xl_embedding()
    path = save_embedding(embedding, tmp_path / "xlemb.pt")
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(data) == ["clip_g", "clip_l"]
    assert_a1111_loads(data, embedding.vectors)
    # Why: the single-tensor .pt's keys beside them would break A1111's SDXL branch.
    with pytest.raises(AttributeError):
        a1111_load_from_data({**data, "name": "xlemb", "step": 40})
    assert load_embedding(path).step == 0, "a .pt cannot carry the step for SDXL (docs/sdxl.md)"


def test_the_image_embedding_carries_sdxl_in_the_chunk_and_the_pixels(tmp_path):
    embedding = xl_embedding()
    path = save_image_with_embedding(
        Image.new("RGB", (64, 64), "white"), embedding_to_dict(embedding), tmp_path / "xlemb-40.png", "xlemb"
    )
    from_chunk = extract_embedding_data(path)
    assert_a1111_loads(from_chunk, embedding.vectors)
    with Image.open(path) as image:  # the chunk stripped: A1111 falls back to the pixel block
        stripped = image.convert("RGB")
    assert_a1111_loads(extract_embedding_data(stripped), embedding.vectors)
    loaded = load_embedding(path)
    assert loaded.name == "xlemb-40" and torch.allclose(loaded.vectors["clip_g"], embedding.vectors["clip_g"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_sdxl_form_the_other_tools_write_loads(tmp_path, dtype):
    vectors = {key: value.to(dtype) for key, value in xl_vectors(3).items()}
    # kohya's sdxl_train_textual_inversion: clip_l/clip_g in a .safetensors with its own metadata, or a .pt
    save_file(vectors, str(tmp_path / "kohya.safetensors"), metadata={"ss_output_name": "kohya"})
    torch.save(vectors, tmp_path / "kohya.pt")
    # a .bin, and an image's JSON, as A1111 reads them
    torch.save(vectors, tmp_path / "other.bin")
    for name in ("kohya.safetensors", "kohya.pt", "other.bin"):
        loaded = load_embedding(tmp_path / name)
        assert loaded.num_vectors == 3 and loaded.width == 2048
        assert loaded.vectors["clip_l"].dtype == torch.float32
        assert torch.equal(loaded.vectors["clip_g"], vectors["clip_g"].float())


def test_unequal_rows_are_refused_by_name(tmp_path):
    save_file(
        {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(tmp_path / "bad.safetensors")
    )
    with pytest.raises(UserError, match=r"bad\.safetensors.*clip_l holds 2 vectors and clip_g 3"):
        load_embedding(tmp_path / "bad.safetensors")


def test_an_sd2_embedding_on_sdxl_and_an_sdxl_one_on_sd2_get_clear_messages(tmp_path):
    sdxl, sd2 = sdxl_family(), sd_family("sd2", 1024)
    with pytest.raises(UserError) as on_xl:
        require_fits(tmp_path / "old.pt", torch.zeros(2, 1024), sdxl)
    text = str(on_xl.value)
    assert "old.pt" in text and "SD 2.x" in text and "clip_l 768, clip_g 1280" in text
    with pytest.raises(UserError) as on_sd2:
        require_fits(tmp_path / "new.safetensors", xl_vectors(), sd2)
    text = str(on_sd2.value)
    assert "new.safetensors is an SDXL embedding" in text and "SD 2.x" in text
    with pytest.raises(UserError, match="widths clip_l 768, clip_g 1024"):
        require_fits(
            "swapped.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1024)}, sdxl
        )
    require_fits("fine.safetensors", xl_vectors(), sdxl)  # no error


def test_the_optimizer_state_pairs_with_both_encoders_values(tmp_path):
    embedding = xl_embedding()
    path = save_embedding(embedding, tmp_path / "xlemb.safetensors")
    save_optimizer_state(embedding, path, {"state": {}, "param_groups": []}, {"seed": 1})
    assert load_optimizer_state(load_embedding(path), path) is not None
    changed = Embedding("xlemb", {**embedding.vectors, "clip_g": embedding.vectors["clip_g"] + 1}, 40)
    assert vectors_checksum(changed.vectors) != vectors_checksum(embedding.vectors)
    assert load_optimizer_state(changed, path) is None, "a change to clip_g alone must unpair the state"


def test_non_finite_values_in_either_encoder_are_never_written(tmp_path):
    broken = xl_vectors()
    broken["clip_g"][1, 5] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        save_embedding(Embedding("xlemb", broken, 3), tmp_path / "xlemb.safetensors")
    assert not (tmp_path / "xlemb.safetensors").exists()


def comfyui_embed_for(embed: dict, embed_key: str) -> torch.Tensor:
    """ComfyUI's `sd1_clip.load_embed` choice for one encoder (`SDXLClipModel` asks with "clip_l" for CLIP-L
    and "clip_g" for bigG): `string_to_param`, else `embed[embed_key]`, else the first value."""
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if embed_key is not None and embed_key in embed:
        return embed[embed_key]
    return next(iter(embed.values()))


def test_comfyui_gives_each_encoder_its_own_tensor(tmp_path):
    embedding = xl_embedding()
    data = load_file(str(save_embedding(embedding, tmp_path / "xlemb.safetensors")))
    assert comfyui_embed_for(data, "clip_l").shape == (2, 768)
    assert torch.equal(comfyui_embed_for(data, "clip_g"), embedding.vectors["clip_g"])
