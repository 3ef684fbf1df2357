"""backend.loader.forge_loader: a checkpoint file -> a Forge model object, in inference mode (Forge:
backend/loader.py, decorated `@torch.inference_mode()`, so every weight it creates is an inference tensor).

Forge guesses the architecture from the UNet's keys (`huggingface_guess`) and builds the text encoder, VAE,
tokenizer and scheduler from the JSONs of the matching `backend/huggingface/<repo>/` folder. The stand-in reads
that guess from a JSON file beside the checkpoint (`<checkpoint>.guess.json`, written by tests/forge/tiny_forge.py):
the family, the prediction type, each component's config and the tokenizer's folder. The state dict keys are
the checkpoint's: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`; SDXL's two
text encoders under `conditioner.embedders.0.*` (CLIP-L) and `conditioner.embedders.1.*` (bigG, here already in
transformers' layout: Forge converts open_clip's keys with huggingface_guess). As in Forge, an SDXL text encoder
is `IntegratedCLIP(CLIPTextModel, config, add_text_projection=True)`, and its tokenizers are transformers'
`CLIPTokenizer`s (bigG's pads with "!", id 0).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from backend import memory_management
from backend.diffusion_engine.sd15 import StableDiffusion
from backend.diffusion_engine.sd20 import StableDiffusion2
from backend.diffusion_engine.sdxl import StableDiffusionXL
from backend.nn.clip import IntegratedCLIP
from backend.nn.unet import IntegratedUNet2DConditionModel
from backend.nn.vae import IntegratedAutoencoderKL

GUESS_SUFFIX = ".guess.json"
ENGINES = {"sd1": StableDiffusion, "sd2": StableDiffusion2, "sdxl": StableDiffusionXL}
PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
SDXL_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.",
    "text_encoder_2": "conditioner.embedders.1.",
}


def prefixes_for(family):
    return SDXL_PREFIXES if family == "sdxl" else PREFIXES


class EstimatedConfig(SimpleNamespace):
    def inpaint_model(self):
        return False


def split_state_dict(state_dict, prefixes=PREFIXES):
    parts = {name: {} for name in prefixes}
    for key, value in state_dict.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
    return parts


def _tokenizer(folder, pad_token):
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)


@torch.inference_mode()
def forge_loader(sd, additional_state_dicts=None):
    guess = json.loads(Path(str(sd) + GUESS_SUFFIX).read_text(encoding="utf-8"))
    sdxl = guess["family"] == "sdxl"
    parts = split_state_dict(safetensors.torch.load_file(str(sd)), prefixes_for(guess["family"]))
    folder = Path(guess["tokenizer_dir"])
    components = dict(tokenizer=_tokenizer(folder, guess["pad_token"]))
    components["text_encoder"] = IntegratedCLIP(
        CLIPTextModel, CLIPTextConfig(**guess["text_encoder"]), add_text_projection=sdxl
    )
    if sdxl:
        components["tokenizer_2"] = _tokenizer(folder, guess["pad_token_2"])
        components["text_encoder_2"] = IntegratedCLIP(
            CLIPTextModel, CLIPTextConfig(**guess["text_encoder_2"]), add_text_projection=True
        )
    components["vae"] = IntegratedAutoencoderKL(**guess["vae"])
    unet = components["unet"] = IntegratedUNet2DConditionModel(**guess["unet"])
    for name in parts:
        components[name].load_state_dict(parts[name], strict=True)
    # What Forge's loader sets on the UNet for the patcher and KModel (storage and computation dtype, devices).
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = memory_management.get_torch_device()
    unet.offload_device = unet.initial_device = memory_management.unet_offload_device()
    components["scheduler"] = SimpleNamespace(config=SimpleNamespace(**guess["scheduler"]))
    return ENGINES[guess["family"]](EstimatedConfig(**guess.get("config", {})), components)
