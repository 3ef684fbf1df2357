"""Embedding files in every format A1111 reads, written the way A1111 writes them (reference/a1111.md §1.2).

Loading never unpickles arbitrary objects: `.pt`/`.bin` go through `torch.load(weights_only=True)`, which
admits only containers, primitives and tensors (what A1111's own safe unpickler admits), safetensors hold
tensors only, and images carry JSON.
"""

from __future__ import annotations

import contextlib
import io
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from ti_trainer.embeddings.checks import (
    has_non_finite,
    require_finite_on_load,
    require_finite_on_save,
    tensors_in,
)
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.vectors import detached_copy, vector_tensors
from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write

IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's two tensors, as every SDXL tool names them

# Written by A1111 for every embedding: the token id of "*" in SD1's CLIP vocabulary, a legacy of the
# original textual_inversion code. Kept for files that older tools read.
_LEGACY_STRING_TO_TOKEN = {"*": 265}

# A1111 v1.10.1 checks a .pt before unpickling it (modules/safe.py) and refuses, as "may be malicious", any
# zip entry other than data.pkl, data/<n>, version, byteorder and .data/serialization_id. torch 2.4 and later
# add .format_version and .storage_alignment, so those two are left out: torch reads archives without them,
# as torch 2.1 (which A1111 ships) writes them.
_A1111_ZIP_ENTRIES = re.compile(r"^[^/]+/(data/\d+|version|byteorder|\.data/serialization_id|data\.pkl)$")
# torch starts each record's bytes on a 64-byte boundary (so the file can be memory-mapped, as diffusers does);
# the padding goes in an extra field of the local header, as torch's own writer does it.
_RECORD_ALIGNMENT = 64


def embedding_to_dict(embedding: Embedding) -> dict[str, Any]:
    """The six keys A1111 writes, holding only primitives and a plain float32 CPU tensor.

    An SDXL embedding (one tensor per encoder) is the two tensors alone, `{"clip_l", "clip_g"}`: A1111 v1.10.1
    takes every value of such a dict for a tensor (`{k: v.detach() for k, v in data.items()}`), so a name or a
    step beside them would stop it loading the file (reference/sdxl.md §3; docs/sdxl.md).
    """
    if embedding.per_encoder:
        return detached_copy(embedding.vectors)
    return {
        "string_to_token": dict(_LEGACY_STRING_TO_TOKEN),
        "string_to_param": {"*": embedding.vectors.detach().to("cpu", torch.float32).clone().contiguous()},
        "name": embedding.name,
        "step": int(embedding.step),
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
    }


def save_embedding(embedding: Embedding, path: Path) -> Path:
    """Write `.pt` (A1111's dict) or `.safetensors` (one tensor; metadata as strings) atomically."""
    path = Path(path)
    for tensor in vector_tensors(embedding.vectors):
        require_finite_on_save(tensor, path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        # SDXL: `clip_l` and `clip_g`, as kohya, ComfyUI and diffusers write and read them.
        tensors = (
            embedding_to_dict(embedding)
            if embedding.per_encoder
            else {"emb_params": embedding_to_dict(embedding)["string_to_param"]["*"]}
        )
        metadata = {"name": embedding.name, "step": str(int(embedding.step))}
        for key in ("sd_checkpoint", "sd_checkpoint_name"):
            if getattr(embedding, key):
                metadata[key] = str(getattr(embedding, key))
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    if path.suffix.lower() != ".pt":
        raise UserError(f"Cannot save an embedding as {path.name}: use a .pt or .safetensors file name.")
    data = embedding_to_dict(embedding)
    return atomic_write(path, lambda tmp: torch_save_for_a1111(data, tmp))


def torch_save_for_a1111(data: dict, path: Path) -> None:
    """`torch.save`, with only the zip entries A1111's safe loader admits (see _A1111_ZIP_ENTRIES)."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    with (
        zipfile.ZipFile(buffer) as source,
        Path(path).open("wb") as handle,
        zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as target,
    ):
        for info in source.infolist():
            if not _A1111_ZIP_ENTRIES.match(info.filename):
                continue
            entry = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            # local header: 30 fixed bytes, the name, then our extra field (4-byte header + padding)
            data_start = handle.tell() + 30 + len(info.filename.encode("utf-8")) + 4
            padding = -data_start % _RECORD_ALIGNMENT
            entry.extra = b"FB" + struct.pack("<H", padding) + b"Z" * padding
            target.writestr(entry, source.read(info))


def load_embedding(path: Path) -> Embedding:
    """Read any embedding A1111 reads; raise UserError naming the file when it is not one."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"Embedding file not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): it is not an embedding. Delete it or train again.")
    # A1111 names an embedding after its file (the word written in prompts), except that an image carries
    # its own name.
    name = path.stem
    if suffix in IMAGE_SUFFIXES:
        from ti_trainer.embeddings.png import extract_embedding_data

        data = extract_embedding_data(path)
        if data is None:
            raise UserError(f"{path} is an image without an embedding in it (no sd-ti-embedding data).")
        name = data.get("name") or name
    elif suffix == ".safetensors":
        data = _load_safetensors(path)
    elif suffix in (".pt", ".bin"):
        data = _load_torch(path)
    else:
        raise UserError(
            f"{path.name}: not an embedding file. Use .pt, .bin, .safetensors or a .png with one."
        )
    return embedding_from_data(data, name, path)


def _load_torch(path: Path) -> dict:
    # Embeddings saved under torch 1.11 keep their vectors in a ParameterDict, which A1111's safe loader admits
    # too. torch before 2.5 cannot be told so; those few files then get the message below.
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    admitted = safe_globals([torch.nn.ParameterDict]) if safe_globals else contextlib.nullcontext()
    try:
        with admitted:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # damaged files raise anything from KeyError to struct.error
        # torch's own message would suggest weights_only=False, the unsafe load we refuse to do.
        raise UserError(
            f"{path} could not be read as an embedding: it is damaged, not an embedding, or holds objects other "
            "than tensors, which are not loaded for safety. Use a .pt/.bin saved by A1111 or a .safetensors file."
        ) from error
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not an embedding dictionary.")
    return data


def _load_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            data: dict[str, Any] = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types across versions
        raise UserError(f"{path} could not be read as safetensors: {error}") from error
    meta = {key: metadata[key] for key in ("name", "sd_checkpoint", "sd_checkpoint_name") if key in metadata}
    if "step" in metadata and metadata["step"].isdigit():
        meta["step"] = int(metadata["step"])
    return {"__tensors__": data, **meta}


def embedding_from_data(data: dict, name: str, source: Path | str = "") -> Embedding:
    """Interpret the dict shapes A1111 accepts: `string_to_param`, SDXL `clip_g`/`clip_l`, or one tensor.

    `name` is the name A1111 gives it (the file stem, or the name an image carries); the `name` stored in a
    `.pt` does not count, as in A1111.
    """
    tensors = data.pop("__tensors__", None) if "__tensors__" in data else None
    per_encoder = _sdxl_vectors(tensors if tensors is not None else data, source)
    if per_encoder is not None:
        vectors = per_encoder
    elif tensors is None and "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # legacy torch ParameterDict
        if len(params) != 1:
            raise UserError(
                f"{source}: the embedding holds {len(params)} terms; A1111 embeddings hold exactly one."
            )
        vectors = next(iter(params.values()))
    else:
        tensors = (
            tensors if tensors is not None else {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        )
        if len(tensors) != 1:
            raise UserError(
                f"{source}: expected one tensor, found {len(tensors)} ({', '.join(sorted(tensors)) or 'none'}). "
                "A1111 would not load this file either."
            )
        vectors = next(iter(tensors.values()))
    if per_encoder is None:
        vectors = _vector_rows(vectors, source)
    step = data.get("step")
    return Embedding(
        name=name,
        vectors=detached_copy(vectors),
        step=int(step) if isinstance(step, int) else 0,
        sd_checkpoint=data.get("sd_checkpoint"),
        sd_checkpoint_name=data.get("sd_checkpoint_name"),
    )


def _vector_rows(vectors: Any, source: Path | str, what: str = "vectors") -> torch.Tensor:
    """One tensor of vectors as `[rows, width]` float32, checked for shape and finite values."""
    if not isinstance(vectors, torch.Tensor):
        raise UserError(f"{source}: the embedding's {what} are not a tensor.")
    vectors = vectors.detach().to("cpu", torch.float32)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2:
        raise UserError(f"{source}: {what} have shape {tuple(vectors.shape)}; expected [vectors, width].")
    require_finite_on_load(vectors, source)
    return vectors


def _sdxl_vectors(data: dict, source: Path | str) -> dict[str, torch.Tensor] | None:
    """`clip_l` and `clip_g` when `data` holds both (SDXL's form in A1111, kohya, ComfyUI and diffusers, in a
    .safetensors, a .pt or an image's JSON, in any float dtype), else None. Other keys are not read: A1111
    and ComfyUI take these two alone."""
    if not all(isinstance(data.get(key), torch.Tensor) for key in SDXL_KEYS):
        return None
    vectors = {key: _vector_rows(data[key], source, f"{key} vectors") for key in SDXL_KEYS}
    rows = {key: int(tensor.shape[0]) for key, tensor in vectors.items()}
    if len(set(rows.values())) != 1:
        raise UserError(
            f"{source}: clip_l holds {rows['clip_l']} vectors and clip_g {rows['clip_g']}; an SDXL embedding has "
            "the same number for both text encoders (one per token). The file is damaged or not an embedding."
        )
    return vectors


def optimizer_state_path(embedding_path: Path) -> Path:
    """A1111's sibling name: `foo.pt` -> `foo.pt.optim`."""
    embedding_path = Path(embedding_path)
    return embedding_path.with_name(embedding_path.name + ".optim")


def save_optimizer_state(
    embedding: Embedding, embedding_path: Path, state: dict, extra: dict | None = None
) -> Path:
    """Write `<file>.optim` with A1111's keys (`hash`, `optimizer_state_dict`) plus our resume keys."""
    path = optimizer_state_path(embedding_path)
    # The checksum of non-finite vectors cannot be computed, and the state would pair with a refused file.
    for tensor in vector_tensors(embedding.vectors):
        require_finite_on_save(tensor, path)
    data = {"hash": embedding.checksum(), "optimizer_state_dict": state}
    if extra:
        data["ti_trainer"] = extra
    return atomic_write(path, lambda tmp: torch_save_for_a1111(data, tmp))


def load_optimizer_state(embedding: Embedding, embedding_path: Path) -> dict | None:
    """The `.optim` beside the file if it belongs to these vectors (A1111's checksum rule), else None."""
    path = optimizer_state_path(embedding_path)
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged optimizer file only costs the optimizer's momentum: start it afresh
        return None
    if not isinstance(data, dict) or data.get("hash") != embedding.checksum():
        return None
    # Moments holding NaN/inf would turn the first update's vectors into NaN: start the optimizer afresh.
    if any(has_non_finite(tensor) for tensor in tensors_in(data.get("optimizer_state_dict"))):
        return None
    return data
