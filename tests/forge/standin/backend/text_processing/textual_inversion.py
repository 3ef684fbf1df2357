"""backend.text_processing.textual_inversion: the embedding database each text engine owns (Forge:
backend/text_processing/textual_inversion.py), in our own words.

`EmbeddingDatabase(tokenizer, expected_shape)`: filled from its folders by `load_textual_inversion_embeddings()`
(cleared first; the engine calls it once, when the model loads); a file whose vector width is not
`expected_shape` goes to `skipped_embeddings`. `register_embedding(e)` / `register_embedding_by_name(e, name)`
(None removes) index names by their first token id, longest first; `find_embedding_at_position`; `fixes` is
what the engine hands the token-embedding wrapper for the chunk being encoded. Files: `.pt`/`.bin` (torch.load,
as Forge: no weights_only argument) and `.safetensors`, with A1111's `string_to_param`, SDXL's dict holding
`clip_g` and `clip_l` (every value taken as a tensor; `shape` is the two widths summed, `vectors` the rows of
`clip_g`) or one-tensor dicts. Not here: PNG/WebP embeddings.
"""

import os

import safetensors.torch
import torch


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape=-1):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.embedding_dirs = {}
        self.skipped_embeddings = {}
        self.expected_shape = expected_shape
        self.tokenizer = tokenizer
        self.fixes = []

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def register_embedding(self, embedding):
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding, name):
        ids = self.tokenizer([name], truncation=False, add_special_tokens=False)["input_ids"][0]
        first = ids[0]
        entries = [entry for entry in self.ids_lookup.get(first, []) if entry[1].name != name]
        if embedding is not None:
            entries.append((ids, embedding))
            self.word_embeddings[name] = embedding
        else:
            self.word_embeddings.pop(name, None)
        if entries:
            self.ids_lookup[first] = sorted(entries, key=lambda entry: len(entry[0]), reverse=True)
        else:
            self.ids_lookup.pop(first, None)
        return embedding

    def load_from_file(self, path, filename):
        name, extension = os.path.splitext(filename)
        extension = extension.upper()
        if extension in (".PT", ".BIN"):
            data = torch.load(path, map_location="cpu")
        elif extension == ".SAFETENSORS":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            return
        embedding = create_embedding_from_data(data, name, filename=filename, filepath=path)
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding)
        else:
            self.skipped_embeddings[name] = embedding

    def load_textual_inversion_embeddings(self):
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        for folder in self.embedding_dirs.values():
            if not os.path.isdir(folder):
                continue
            for root, _, files in os.walk(folder, followlinks=True):
                for filename in files:
                    path = os.path.join(root, filename)
                    if os.stat(path).st_size == 0:
                        continue
                    try:
                        self.load_from_file(path, filename)
                    except Exception:
                        print(f"Error loading embedding {filename}")

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset : offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "string_to_param" in data:
        parameters = data["string_to_param"]
        assert len(parameters) == 1, "embedding file has multiple terms in it"
        vec = next(iter(parameters.values())).detach().to(dtype=torch.float32)
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        vec = {key: value.detach().to(dtype=torch.float32) for key, value in data.items()}
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vec = next(iter(data.values()))
        vec = (vec.unsqueeze(0) if vec.dim() == 1 else vec).detach().to(dtype=torch.float32)
    else:
        raise Exception(
            f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept."
        )
    embedding = Embedding(vec, name)
    embedding.step = data.get("step", None)
    embedding.sd_checkpoint = data.get("sd_checkpoint", None)
    embedding.sd_checkpoint_name = data.get("sd_checkpoint_name", None)
    if isinstance(vec, dict):
        embedding.vectors = data["clip_g"].shape[0]
        embedding.shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    else:
        embedding.vectors, embedding.shape = vec.shape[0], vec.shape[-1]
    if filepath:
        embedding.filename = filepath
    return embedding
