"""Embedding files: A1111's init-text mapping, its `.pt` format (checked the way its safe loader checks it), the
formats it reads, refused and damaged files, the `.optim` sibling, atomic writes and `create_embedding`."""

from __future__ import annotations

import collections
import datetime
import io
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ti_trainer.backends.contract import sd_family
from ti_trainer.embeddings.create import MAX_VECTORS, create_embedding
from ti_trainer.embeddings.embedding import Embedding, vectors_from_init
from ti_trainer.embeddings.files import (
    load_embedding,
    load_optimizer_state,
    optimizer_state_path,
    save_embedding,
    save_optimizer_state,
)
from ti_trainer.errors import UserError

A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def distinct_rows(count: int, width: int = 8) -> torch.Tensor:
    """Rows that differ from each other (row i is filled with i + 1), so a wrong row index shows."""
    return torch.arange(1, count + 1, dtype=torch.float32).unsqueeze(1).repeat(1, width)


def assert_same_embedding(found: Embedding, expected: Embedding) -> None:
    assert (found.name, found.step, found.sd_checkpoint, found.sd_checkpoint_name) == (
        expected.name,
        expected.step,
        expected.sd_checkpoint,
        expected.sd_checkpoint_name,
    )
    assert found.vectors.dtype == torch.float32
    assert torch.equal(found.vectors, expected.vectors)


def random_vectors(count: int = 3, width: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


# --- A1111's safe loader, as facts (modules/safe.py in v1.10.1), not as its code ------------------------------
# Before it unpickles a .pt, the WebUI checks the zip's entry names against a fixed list and unpickles data.pkl
# with an unpickler whose find_class admits only: collections.OrderedDict; torch._utils' _rebuild_tensor_v2,
# _rebuild_parameter, _rebuild_device_tensor_from_numpy; torch's Float/Half/Int/Long/Double/Byte/BFloat16
# storages and torch.float32; torch.nn.modules.container.ParameterDict; builtin set (plus some numpy and
# pytorch_lightning names an embedding never needs, left out here: this checker is stricter, not looser).
# Anything else is "forbidden" and the file is reported as possibly malicious.

A1111_ZIP_ENTRY = re.compile(r"^[^/]+/(data/\d+|version|byteorder|\.data/serialization_id|data\.pkl)$")
A1111_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.nn.modules.container", "ParameterDict"): torch.nn.ParameterDict,
    ("torch", "float32"): torch.float32,
    ("__builtin__", "set"): set,
    **{
        ("torch", storage): getattr(torch, storage)
        for storage in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage")
        + ("ByteStorage", "BFloat16Storage")
    },
}


class A1111RefusedFile(Exception):
    pass


class A1111Unpickler(pickle.Unpickler):
    """Admits what A1111's safe unpickler admits and, unlike it, also returns the real tensors."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) not in A1111_GLOBALS:
            raise A1111RefusedFile(f"global '{module}/{name}' is forbidden")
        return A1111_GLOBALS[(module, name)]

    def persistent_load(self, saved_id):
        if saved_id[0] != "storage":
            raise A1111RefusedFile(f"unexpected persistent id {saved_id!r}")
        storage_type, key = saved_id[1], saved_id[2]
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        untyped = (
            torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
        )
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)


def load_like_a1111(path: Path):
    with zipfile.ZipFile(path) as archive:
        for entry in archive.namelist():
            if not A1111_ZIP_ENTRY.match(entry):
                raise A1111RefusedFile(f"bad file inside {path}: {entry}")
        pickles = [entry for entry in archive.namelist() if entry.endswith("/data.pkl")]
        assert len(pickles) == 1
        with archive.open(pickles[0]) as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated; A1111 uses it anyway
            return A1111Unpickler(handle, archive, pickles[0].split("/")[0]).load()


def write_archive(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def test_the_a1111_checker_refuses_what_a1111_refuses(tmp_path):
    """The checker must be able to say no, or the format tests below prove nothing."""
    admitted = write_archive(tmp_path / "ok.pt", {"archive/data.pkl": pickle.dumps({"a": [1, 2.0, None]})})
    assert load_like_a1111(admitted) == {"a": [1, 2.0, None]}
    dated = {"archive/data.pkl": pickle.dumps({"when": datetime.date(2024, 1, 1)}, protocol=2)}
    with pytest.raises(A1111RefusedFile, match="datetime"):
        load_like_a1111(write_archive(tmp_path / "date.pt", dated))
    # torch 2.4+ adds this entry to every archive it writes; A1111 v1.10.1 refuses it
    extra = {"archive/data.pkl": pickle.dumps({}), "archive/.format_version": b"1"}
    with pytest.raises(A1111RefusedFile, match="format_version"):
        load_like_a1111(write_archive(tmp_path / "extra.pt", extra))


# A1111's Embedding.checksum() (§1.1): values x100, each truncated to an int, folded by r = (r*281 ^ v*997)
# masked to 32 bits; the low 16 bits as 4 hex digits. Pairs a .optim file with its embedding.
def a1111_checksum(vectors: torch.Tensor) -> str:
    r = 0
    for value in (vectors.float() * 100).reshape(-1):
        r = (r * 281 ^ int(value) * 997) & 0xFFFFFFFF
    return f"{r & 0xFFFF:04x}"


# --- init text -> vectors (A1111 §1.4) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "vectors", "rows"),
    [
        (2, 4, [0, 0, 1, 1]),  # fewer tokens than vectors: each token repeated in a block
        (4, 2, [0, 2]),  # more tokens than vectors: strided, not truncated to the first ones
        (3, 5, [0, 0, 1, 1, 2]),
        (5, 3, [0, 1, 3]),
        (3, 3, [0, 1, 2]),
        (1, 3, [0, 0, 0]),
        (7, 1, [0]),
    ],
)
def test_init_vectors_copy_token_floor_of_i_times_t_over_n(tokens, vectors, rows):
    init = distinct_rows(tokens)
    result = vectors_from_init(init, vectors, width=8)
    assert torch.equal(result, init[rows])
    assert result.dtype == torch.float32


@pytest.mark.parametrize("init", [None, torch.zeros(0, 8)])
def test_init_vectors_without_init_tokens_are_zeros(init):
    result = vectors_from_init(init, 4, width=8)
    assert result.shape == (4, 8)
    assert not result.any()


def test_init_vectors_are_a_float32_copy_detached_from_the_token_table():
    table = torch.nn.Parameter(distinct_rows(2).double())
    result = vectors_from_init(table, 2, width=8)
    assert result.dtype == torch.float32 and not result.requires_grad
    result += 100
    assert table.max() == 2


def test_init_vectors_refuse_zero_vectors():
    with pytest.raises(ValueError):
        vectors_from_init(distinct_rows(2), 0, width=8)


# --- the .pt A1111 writes --------------------------------------------------------------------------------------


def test_pt_has_exactly_a1111s_six_keys_and_passes_its_safe_loader(tmp_path):
    vectors = random_vectors(3, 1024)
    embedding = Embedding(
        "my-style", vectors, step=500, sd_checkpoint="0123456789", sd_checkpoint_name="v2-1"
    )
    path = save_embedding(embedding, tmp_path / "my-style.pt")

    data = load_like_a1111(path)
    assert set(data) == A1111_KEYS
    assert data["string_to_token"] == {"*": 265}
    assert list(data["string_to_param"]) == ["*"]
    saved = data["string_to_param"]["*"]
    assert type(saved) is torch.Tensor  # not a Parameter, not a subclass
    assert saved.dtype == torch.float32 and saved.device.type == "cpu" and not saved.requires_grad
    assert torch.equal(saved, vectors)
    assert data["name"] == "my-style"
    assert type(data["step"]) is int and data["step"] == 500
    assert data["sd_checkpoint"] == "0123456789" and data["sd_checkpoint_name"] == "v2-1"


def test_pt_from_a_half_trainable_non_contiguous_tensor_is_still_plain_float32(tmp_path):
    source = torch.nn.Parameter(random_vectors(16, 2).half().t())  # [2, 16] view, fp16, requires grad
    path = save_embedding(Embedding("e", source, step=3), tmp_path / "e.pt")
    saved = load_like_a1111(path)["string_to_param"]["*"]
    assert type(saved) is torch.Tensor and saved.dtype == torch.float32 and not saved.requires_grad
    assert saved.shape == (2, 16) and saved.is_contiguous()
    assert torch.equal(saved, source.detach().float())


def test_pt_zip_holds_only_entries_a1111_admits_and_can_be_memory_mapped(tmp_path):
    path = save_embedding(Embedding("e", random_vectors(2, 1024), step=1), tmp_path / "e.pt")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    assert all(A1111_ZIP_ENTRY.match(name) for name in names), names
    assert any(name.endswith("/data.pkl") for name in names)
    # diffusers' load_textual_inversion memory-maps zip checkpoints; that needs torch's record layout.
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert torch.equal(data["string_to_param"]["*"], random_vectors(2, 1024))


def test_pt_round_trips_through_load_embedding(tmp_path):
    vectors = random_vectors(4, 1024, seed=1)
    saved = Embedding("style", vectors, step=120, sd_checkpoint="abcdef0123", sd_checkpoint_name="model")
    loaded = load_embedding(save_embedding(saved, tmp_path / "style.pt"))
    assert_same_embedding(loaded, saved)


def test_the_name_is_the_file_stem_as_in_a1111(tmp_path):
    """A1111 names a .pt/.bin/.safetensors embedding after its file, whatever name is stored inside."""
    path = save_embedding(Embedding("old-name", random_vectors()), tmp_path / "old-name.pt")
    renamed = path.rename(tmp_path / "new-name.pt")
    assert load_embedding(renamed).name == "new-name"


def test_saving_to_another_suffix_is_refused(tmp_path):
    with pytest.raises(UserError, match="e.bin"):
        save_embedding(Embedding("e", random_vectors()), tmp_path / "e.bin")
    assert not list(tmp_path.iterdir())


# --- .safetensors -----------------------------------------------------------------------------------------------


def test_safetensors_round_trip_holds_one_tensor_a1111_reads(tmp_path):
    vectors = random_vectors(2, 1024, seed=2)
    embedding = Embedding("s", vectors, step=77, sd_checkpoint="0123456789", sd_checkpoint_name="m")
    path = save_embedding(embedding, tmp_path / "s.safetensors")

    tensors = load_file(path)  # what A1111 calls; a single-tensor dict is its "diffuser concept" case
    assert list(tensors) == ["emb_params"]
    assert tensors["emb_params"].dtype == torch.float32 and torch.equal(tensors["emb_params"], vectors)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["step"] == "77"
    assert_same_embedding(load_embedding(path), embedding)


def test_safetensors_without_optional_metadata(tmp_path):
    path = save_embedding(Embedding("s", random_vectors(1, 8)), tmp_path / "s.safetensors")
    loaded = load_embedding(path)
    assert loaded.step == 0 and loaded.sd_checkpoint is None and loaded.sd_checkpoint_name is None


# --- files other tools write ------------------------------------------------------------------------------------


def test_diffusers_learned_embeds_bin_one_dimensional_is_one_vector(tmp_path):
    vector = random_vectors(1, 1024, seed=3)[0]
    torch.save({"<cat-toy>": vector}, tmp_path / "learned_embeds.bin")
    loaded = load_embedding(tmp_path / "learned_embeds.bin")
    assert loaded.vectors.shape == (1, 1024)
    assert torch.equal(loaded.vectors[0], vector)
    assert loaded.name == "learned_embeds" and loaded.step == 0


def test_kohya_safetensors_emb_params(tmp_path):
    vectors = random_vectors(6, 1024, seed=4).half()
    save_file({"emb_params": vectors}, str(tmp_path / "kohya.safetensors"))
    loaded = load_embedding(tmp_path / "kohya.safetensors")
    assert loaded.vectors.dtype == torch.float32
    assert torch.equal(loaded.vectors, vectors.float())


def test_string_to_param_dict_with_only_some_keys(tmp_path):
    vectors = random_vectors(2, 768, seed=5)
    torch.save({"string_to_param": {"*": vectors}, "step": 12}, tmp_path / "old.pt")
    loaded = load_embedding(tmp_path / "old.pt")
    assert torch.equal(loaded.vectors, vectors) and loaded.step == 12 and loaded.sd_checkpoint is None


def test_string_to_param_as_a_legacy_parameter_dict(tmp_path):
    """A1111 admits a ParameterDict (files from torch 1.11) and unwraps its `_parameters`."""
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch before 2.5 cannot admit ParameterDict in a weights-only load")
    vectors = random_vectors(2, 8, seed=6)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_param": params, "step": 4}, tmp_path / "legacy.pt")
    loaded = load_embedding(tmp_path / "legacy.pt")
    assert type(loaded.vectors) is torch.Tensor and not loaded.vectors.requires_grad
    assert torch.equal(loaded.vectors, vectors) and loaded.step == 4


# --- files that are not (our kind of) embeddings -----------------------------------------------------------


def assert_refused_naming(path: Path, *more: str) -> UserError:
    with pytest.raises(UserError) as raised:
        load_embedding(path)
    message = str(raised.value)
    assert path.name in message
    for text in more:
        assert text in message
    return raised.value


def test_a_file_with_several_tensors_is_refused(tmp_path):
    torch.save({"a": random_vectors(1, 8), "b": random_vectors(1, 8)}, tmp_path / "two.pt")
    assert_refused_naming(tmp_path / "two.pt")
    save_file({"a": random_vectors(1, 8), "b": random_vectors(1, 8)}, str(tmp_path / "two.safetensors"))
    assert_refused_naming(tmp_path / "two.safetensors")


def test_string_to_param_with_several_terms_is_refused(tmp_path):
    torch.save({"string_to_param": {"*": random_vectors(), "+": random_vectors()}}, tmp_path / "terms.pt")
    assert_refused_naming(tmp_path / "terms.pt")


def test_an_sdxl_embedding_loads_and_is_refused_by_name_on_an_sd2_model(tmp_path):
    """It used to be refused on load; SDXL is supported now, so the refusal comes where it meets a model of
    another family (tests/test_sdxl_files.py has the SDXL forms)."""
    from ti_trainer.backends.contract import sd_family
    from ti_trainer.embeddings.checks import require_fits

    save_file(
        {"clip_g": random_vectors(2, 1280), "clip_l": random_vectors(2, 768)},
        str(tmp_path / "xl.safetensors"),
    )
    embedding = load_embedding(tmp_path / "xl.safetensors")
    with pytest.raises(UserError) as raised:
        require_fits(tmp_path / "xl.safetensors", embedding.vectors, sd_family("sd2", 1024))
    assert "SDXL" in str(raised.value) and "xl.safetensors" in str(raised.value)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors", ".png"])
def test_an_empty_file_is_refused(tmp_path, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    assert_refused_naming(tmp_path / f"empty{suffix}", "0 bytes")


def garbage_files() -> dict[str, bytes]:
    saved = io.BytesIO()
    torch.save({"string_to_param": {"*": random_vectors()}}, saved)
    files = {
        "text": b"hello, this is not an embedding",
        "zip_header_only": b"PK\x03\x04" + bytes(64),
        "truncated_pt": saved.getvalue()[:300],
        "plain_pickle_int": pickle.dumps(5),
    }
    # Seeds whose bytes make torch.load raise KeyError, IndexError, struct.error and EOFError, not only
    # UnpicklingError: the loader must turn every one into a message.
    for seed in (6, 8, 15, 20, 22, 33):
        files[f"random_{seed}"] = bytes(random.Random(seed).randrange(256) for _ in range(512))
    return files


@pytest.mark.parametrize("kind", sorted(garbage_files()))
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_a_garbage_torch_file_is_refused_with_a_message(tmp_path, kind, suffix):
    path = tmp_path / f"{kind}{suffix}"
    path.write_bytes(garbage_files()[kind])
    error = assert_refused_naming(path)
    assert "weights_only" not in str(error)  # torch's message advises the unsafe load; ours must not


def test_a_garbage_safetensors_file_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_refused_naming(tmp_path / "junk.safetensors")


def test_a_pt_holding_something_other_than_a_dict_is_refused(tmp_path):
    torch.save(random_vectors(), tmp_path / "bare.pt")
    assert_refused_naming(tmp_path / "bare.pt")


def test_vectors_of_three_dimensions_are_refused(tmp_path):
    torch.save({"string_to_param": {"*": torch.zeros(2, 3, 8)}}, tmp_path / "cube.pt")
    assert_refused_naming(tmp_path / "cube.pt")


def test_missing_file_and_unknown_suffix_are_refused(tmp_path):
    assert_refused_naming(tmp_path / "nowhere.pt")
    (tmp_path / "notes.txt").write_text("vectors")
    assert_refused_naming(tmp_path / "notes.txt")


# --- malicious pickles ----------------------------------------------------------------------------------------


class CreatesMarker:
    """Unpickling this runs code: it creates the file at `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def write_malicious(path: Path, marker: Path, zip_format: bool) -> Path:
    payload = {"string_to_param": {"*": CreatesMarker(marker)}, "hash": "0000"}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("zip_format", [True, False])
def test_the_malicious_payload_really_runs_code_when_unpickled_unsafely(tmp_path, zip_format):
    """Proof the payload below is live: without weights_only it creates its marker."""
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", marker, zip_format)
    if zip_format:
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    ("file_name", "zip_format"), [("evil.pt", True), ("evil.bin", False), ("e.bin", True)]
)
def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path, file_name, zip_format):
    marker = tmp_path / "pwned"
    path = write_malicious(tmp_path / file_name, marker, zip_format)
    assert_refused_naming(path, "safety")
    assert not marker.exists()


def test_a_malicious_optim_file_is_ignored_and_runs_nothing(tmp_path):
    embedding = Embedding("e", random_vectors())
    path = save_embedding(embedding, tmp_path / "e.pt")
    marker = tmp_path / "pwned"
    write_malicious(optimizer_state_path(path), marker, zip_format=True)
    assert load_optimizer_state(embedding, path) is None
    assert not marker.exists()


# --- the .optim sibling -----------------------------------------------------------------------------------------


def trained_adamw_state(vectors: torch.Tensor) -> dict:
    parameter = vectors.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([parameter], lr=0.005, weight_decay=0.0)
    for _ in range(2):
        optimizer.zero_grad()
        (parameter**2).sum().backward()
        optimizer.step()
    return optimizer.state_dict()


def test_checksum_is_a1111s():
    for seed in range(5):
        vectors = random_vectors(3, 64, seed=seed) * 3
        assert Embedding("e", vectors).checksum() == a1111_checksum(vectors)
    # exact values: x100 = 50, -125, 200, 0 (0.009 x100 truncates to 0, -0.009 too)
    fixed = torch.tensor([[0.5, -1.25], [2.0, 0.009], [-0.009, 0.0]])
    assert Embedding("e", fixed).checksum() == a1111_checksum(fixed)
    assert Embedding("e", fixed).checksum() != Embedding("e", fixed + 1).checksum()


def test_optim_sibling_holds_a1111s_keys_and_checksum(tmp_path):
    vectors = random_vectors(2, 32, seed=7)
    embedding = Embedding("e", vectors, step=40)
    path = save_embedding(embedding, tmp_path / "e.pt")
    state = trained_adamw_state(vectors)
    optim_path = save_optimizer_state(embedding, path, state, extra={"seed": 9})

    assert optim_path == tmp_path / "e.pt.optim"
    data = load_like_a1111(optim_path)
    assert data["hash"] == a1111_checksum(vectors)
    assert data["ti_trainer"] == {"seed": 9}
    saved = data["optimizer_state_dict"]
    assert saved["param_groups"] == state["param_groups"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(saved["state"][0][key], state["state"][0][key])


def test_optim_state_is_loaded_only_when_the_checksum_matches(tmp_path):
    vectors = random_vectors(2, 32, seed=8)
    embedding = Embedding("e", vectors, step=40)
    path = save_embedding(embedding, tmp_path / "e.pt")
    assert load_optimizer_state(embedding, path) is None  # no .optim yet

    state = trained_adamw_state(vectors)
    save_optimizer_state(embedding, path, state)
    loaded = load_optimizer_state(Embedding("e", vectors.clone(), step=40), path)
    assert loaded is not None and loaded["hash"] == embedding.checksum()
    restored = torch.optim.AdamW([vectors.clone().requires_grad_(True)], lr=0.005)
    restored.load_state_dict(loaded["optimizer_state_dict"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])

    moved_on = Embedding("e", vectors + 0.5, step=41)  # the file belongs to other vectors now
    assert moved_on.checksum() != embedding.checksum()
    assert load_optimizer_state(moved_on, path) is None


def test_a_damaged_optim_file_is_ignored(tmp_path):
    embedding = Embedding("e", random_vectors())
    path = save_embedding(embedding, tmp_path / "e.pt")
    optimizer_state_path(path).write_bytes(b"PK\x03\x04 broken")
    assert load_optimizer_state(embedding, path) is None


# --- atomic writes ---------------------------------------------------------------------------------------------


def files_in(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def test_saving_leaves_no_temporary_files(tmp_path):
    embedding = Embedding("e", random_vectors())
    for _ in range(2):  # a first write and an overwrite
        path = save_embedding(embedding, tmp_path / "e.pt")
        save_optimizer_state(embedding, path, trained_adamw_state(embedding.vectors))
        save_embedding(embedding, tmp_path / "e.safetensors")
    assert files_in(tmp_path) == {"e.pt", "e.pt.optim", "e.safetensors"}


def failing_write(data, target, *args, **kwargs):
    """Writes half a file where it was asked to, then fails: a crash in the middle of a save."""
    if hasattr(target, "write"):
        target.write(b"half a file")
    else:
        Path(target).write_bytes(b"half a file")
    raise OSError("disk full")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_failing_write_leaves_the_previous_file_intact(tmp_path, monkeypatch, suffix):
    before = Embedding("e", random_vectors(seed=10), step=100)
    path = save_embedding(before, tmp_path / f"e{suffix}")

    import safetensors.torch

    monkeypatch.setattr(torch, "save", failing_write)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(Embedding("e", random_vectors(seed=11), step=200), path)
    monkeypatch.undo()

    assert_same_embedding(load_embedding(path), before)
    assert files_in(tmp_path) == {path.name}


def test_a_failing_optim_write_leaves_the_previous_one(tmp_path, monkeypatch):
    embedding = Embedding("e", random_vectors(seed=12), step=10)
    path = save_embedding(embedding, tmp_path / "e.pt")
    save_optimizer_state(embedding, path, trained_adamw_state(embedding.vectors))
    monkeypatch.setattr(torch, "save", failing_write)
    with pytest.raises(OSError):
        save_optimizer_state(embedding, path, {"state": {}, "param_groups": []})
    monkeypatch.undo()
    assert load_optimizer_state(embedding, path)["optimizer_state_dict"]["state"]  # still the trained state
    assert files_in(tmp_path) == {"e.pt", "e.pt.optim"}


# --- create_embedding (A1111 §1.4) -------------------------------------------------------------------------


class WordTableBackend:
    """Token vectors from a fixed table: word i of the vocabulary is one token whose vector is filled with i."""

    text_width = 8
    family = sd_family("sd2", 8)  # one text encoder: create writes A1111's single tensor
    vocabulary = ["zero", "painting", "style", "of", "a", "cat"]

    def __init__(self):
        self.asked: list[str] = []

    def token_vectors(self, text: str) -> torch.Tensor:
        self.asked.append(text)
        ids = [self.vocabulary.index(word) for word in text.split()]
        return torch.tensor(ids, dtype=torch.float32).unsqueeze(1).repeat(1, self.text_width)


def row_values(vectors: torch.Tensor) -> list[float]:
    assert all(len(set(row.tolist())) == 1 for row in vectors)
    return [row[0].item() for row in vectors]


def test_create_writes_step_zero_pt_initialised_from_the_init_text(tmp_path):
    backend = WordTableBackend()
    path = create_embedding(backend, "my-style", "painting style", 4, tmp_path)
    assert path == tmp_path / "my-style.pt"
    data = load_like_a1111(path)
    assert set(data) == A1111_KEYS
    assert data["step"] == 0 and type(data["step"]) is int
    assert data["name"] == "my-style"
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] is None
    # two init tokens ("painting"=1, "style"=2) over four vectors: blocks 1, 1, 2, 2
    assert row_values(data["string_to_param"]["*"]) == [1, 1, 2, 2]


def test_create_strides_through_more_init_tokens_than_vectors(tmp_path):
    path = create_embedding(WordTableBackend(), "e", "painting of a cat", 2, tmp_path)
    assert row_values(load_embedding(path).vectors) == [1, 4]  # tokens 0 and 2 of [1, 3, 4, 5]


def test_create_with_empty_init_text_gives_zeros_without_tokenizing(tmp_path):
    backend = WordTableBackend()
    path = create_embedding(backend, "blank", "", 3, tmp_path)
    vectors = load_embedding(path).vectors
    assert vectors.shape == (3, 8) and not vectors.any()
    assert backend.asked == []


def test_create_from_the_tiny_models_token_embeddings(tmp_path):
    from ti_trainer.backends.tiny import tiny_backend

    backend = tiny_backend()
    init = backend.token_vectors("painting style")
    assert init.shape[0] == 2
    vectors = load_embedding(create_embedding(backend, "tiny", "painting style", 3, tmp_path)).vectors
    assert vectors.shape == (3, backend.text_width)
    assert torch.equal(vectors, init[[0, 0, 1]])


def test_create_refuses_an_existing_name_unless_overwriting(tmp_path):
    backend = WordTableBackend()
    first = create_embedding(backend, "taken", "painting", 1, tmp_path)
    original = first.read_bytes()
    with pytest.raises(UserError, match="already exists") as raised:
        create_embedding(backend, "taken", "cat", 1, tmp_path)
    assert str(first) in str(raised.value)
    assert first.read_bytes() == original

    create_embedding(backend, "taken", "cat", 2, tmp_path, overwrite=True)
    assert row_values(load_embedding(first).vectors) == [5, 5]


def test_create_refuses_a_name_taken_by_a_safetensors_file(tmp_path):
    save_embedding(Embedding("taken", random_vectors(1, 8)), tmp_path / "taken.safetensors")
    with pytest.raises(UserError, match="taken.safetensors"):
        create_embedding(WordTableBackend(), "taken", "cat", 1, tmp_path)
    assert files_in(tmp_path) == {"taken.safetensors"}


@pytest.mark.parametrize("name", ["sub/name", "../escape", "back\\slash", "..\\up", "", "   "])
def test_create_refuses_path_separators_and_empty_names(tmp_path, name):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    with pytest.raises(UserError):
        create_embedding(WordTableBackend(), name, "cat", 1, folder)
    assert files_in(folder) == set()
    assert files_in(tmp_path) == {"embeddings"}


@pytest.mark.parametrize("count", [0, -1, MAX_VECTORS + 1, 200])
def test_create_refuses_vector_counts_outside_1_to_75(tmp_path, count):
    with pytest.raises(UserError, match="75"):
        create_embedding(WordTableBackend(), "e", "cat", count, tmp_path)
    assert files_in(tmp_path) == set()


@pytest.mark.parametrize("count", [1, 75])
def test_create_accepts_the_limits(tmp_path, count):
    assert MAX_VECTORS == 75
    path = create_embedding(WordTableBackend(), f"e{count}", "painting style", count, tmp_path)
    assert load_embedding(path).num_vectors == count
