"""modules.sd_hijack_open_clip: the wrappers over OpenCLIP text encoders.

SD 2.x (ldm's FrozenOpenCLIPEmbedder): open_clip's own BPE tokenizer (the module-level one, as the WebUI uses),
no start/end tokens from `tokenize`, pad id 0, and the wrapped model's `encode_with_transformer` (its configured
layer: penultimate + ln_final). SDXL's bigG (sgm's FrozenOpenCLIPEmbedder2): the same tokens; the configured
layer's entry of sgm's output dict (penultimate: no ln_final) with sgm's pooled vector attached.
"""

import open_clip.tokenizer
import torch

from modules import devices, sd_hijack_clip

tokenizer = open_clip.tokenizer._tokenizer


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.comma_token = tokenizer.encoder[",</w>"]
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        return self.wrapped.encode_with_transformer(tokens)

    def encode_embedding_init_text(self, init_text, nvpt):
        layer = self.wrapped.model.token_embedding.wrapped
        ids = torch.asarray([tokenizer.encode(init_text)], device=devices.device, dtype=torch.int)
        return layer(ids.to(layer.weight.device)).squeeze(0)


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.comma_token = tokenizer.encoder[",</w>"]
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.encode_with_transformer(tokens)
        z = outputs[self.wrapped.layer]
        pooled = outputs.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        layer = self.wrapped.model.token_embedding.wrapped
        ids = torch.asarray([tokenizer.encode(init_text)], device=devices.device, dtype=torch.int)
        return layer(ids.to(layer.weight.device)).squeeze(0)
