"""modules.textual_inversion.textual_inversion: Embedding and the embedding database (a1111.md §1.1–1.3).

Loading: every file under each embeddings folder (recursively, zero-byte files skipped), `.pt`/`.bin` through
the WebUI's safe loader, `.safetensors`; the width of each embedding is checked against the loaded model's
text encoder and a mismatch is put in `skipped_embeddings`, silently. Without force, nothing reloads unless a
folder's own mtime moved. Images carrying embeddings are out of this stand-in's scope and ignored.
"""

import hashlib
import os
import re
import zipfile

import safetensors.torch
import torch

from modules import devices, shared

# modules/safe.py: a pickle archive may hold only these entries, or it is refused as possibly malicious.
_SAFE_ZIP_ENTRY = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|\.data/serialization_id|(data\.pkl))$")


def safe_load(path):
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not _SAFE_ZIP_ENTRY.match(name):
                raise Exception(f"bad file inside {path}: {name}")
    return torch.load(path, map_location="cpu", weights_only=True)


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.cached_checksum = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename = None
        self.hash = None
        self.shorthash = None

    def set_hash(self, value):
        self.hash = value
        self.shorthash = value[:12]


class DirWithTextualInversionEmbeddings:
    def __init__(self, path):
        self.path = path
        self.mtime = None

    def has_changed(self):
        if not os.path.isdir(self.path):
            return False
        mtime = os.path.getmtime(self.path)
        return self.mtime is None or mtime > self.mtime

    def update(self):
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(devices.device, dtype=torch.float32)
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        # Every value is taken for a tensor, as A1111 v1.10.1 does: a .pt with other keys beside clip_l and
        # clip_g (a name, a step) fails to load there, and so here.
        vec = {k: v.detach().to(devices.device, dtype=torch.float32) for k, v in data.items()}
    elif isinstance(data, dict) and torch.is_tensor(next(iter(data.values()))):
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        vec = (emb.unsqueeze(0) if emb.dim() == 1 else emb).detach().to(devices.device, dtype=torch.float32)
    else:
        raise Exception(
            f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept."
        )

    embedding = Embedding(vec, name)
    embedding.step = data.get("step", None)
    embedding.sd_checkpoint = data.get("sd_checkpoint", None)
    embedding.sd_checkpoint_name = data.get("sd_checkpoint_name", None)
    if isinstance(vec, dict):
        embedding.vectors = vec["clip_g"].shape[0]
        embedding.shape = vec["clip_g"].shape[-1] + vec["clip_l"].shape[-1]
    else:
        embedding.vectors = vec.shape[0]
        embedding.shape = vec.shape[-1]
    embedding.filename = filepath
    if filepath:
        with open(filepath, "rb") as handle:
            embedding.set_hash(hashlib.sha256(handle.read()).hexdigest())
    return embedding


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}
        self.previously_displayed_embeddings = ()
        self.load_errors = []  # the WebUI prints these as "Error loading embedding <file>"

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        """Make `name` recognised in prompts (by its token ids); `embedding=None` unregisters it."""
        ids = model.cond_stage_model.tokenize([name])[0]
        first_id = ids[0]
        lookup = self.ids_lookup.setdefault(first_id, [])
        if name in self.word_embeddings:
            lookup = [entry for entry in lookup if entry[1].name != name]
        if embedding is not None:
            lookup = lookup + [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda entry: len(entry[0]), reverse=True)
        if embedding is None:
            self.word_embeddings.pop(name, None)
            if not self.ids_lookup[first_id]:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def get_expected_shape(self):
        return shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1).shape[1]

    def load_from_file(self, path, filename):
        name, extension = os.path.splitext(filename)
        extension = extension.upper()
        if extension in (".BIN", ".PT"):
            data = safe_load(path)
        elif extension == ".SAFETENSORS":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            return
        embedding = create_embedding_from_data(data, name, filename=filename, filepath=path)
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_from_dir(self, embedding_dir):
        if not os.path.isdir(embedding_dir.path):
            return
        for root, _, filenames in os.walk(embedding_dir.path, followlinks=True):
            for filename in filenames:
                path = os.path.join(root, filename)
                try:
                    if os.stat(path).st_size == 0:
                        continue
                    self.load_from_file(path, filename)
                except Exception as error:
                    self.load_errors.append(f"Error loading embedding {filename}: {error}")

    def load_textual_inversion_embeddings(self, force_reload=False):
        if not force_reload and not any(d.has_changed() for d in self.embedding_dirs.values()):
            return
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.load_errors.clear()
        self.expected_shape = self.get_expected_shape()
        for embedding_dir in self.embedding_dirs.values():
            self.load_from_dir(embedding_dir)
            embedding_dir.update()
        self.word_embeddings = dict(sorted(self.word_embeddings.items(), key=lambda item: item[0].lower()))

    def find_embedding_at_position(self, tokens, offset):
        candidates = self.ids_lookup.get(tokens[offset], None)
        if candidates is None:
            return None, None
        for ids, embedding in candidates:
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
