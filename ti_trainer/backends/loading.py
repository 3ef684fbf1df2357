"""Pick and load the standalone backend: the built-in tiny model, a diffusers folder, or a checkpoint file."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ti_trainer.errors import UserError
from ti_trainer.text.conditioning import TokenIds

if TYPE_CHECKING:
    from ti_trainer.backends.diffusers_backend import DiffusersBackend

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
# The key A1111 recognises an SDXL base checkpoint by (sd_models_config.py): bigG's final norm in sgm's
# conditioner. A diffusers folder is SDXL when it has a second text encoder.
SDXL_CHECKPOINT_KEY = "conditioner.embedders.1.model.ln_final.weight"


def built_in_model(model_name: str | None) -> tuple[str, str | None] | None:
    """The `--model` and parameterization that load the built-in model a backend named `model_name` was
    (`tiny-sdxl`; `tiny-sd2-v` and the other tiny SD ones), or None for any other model: a run's settings
    record the model's name, not where its file is."""
    if model_name == TINY_SDXL:
        return TINY_SDXL, None
    tiny = re.fullmatch(r"tiny-sd[12]-(eps|v)", model_name or "")
    return (TINY, tiny.group(1)) if tiny else None


def compare_command(run_folder: Path, model_name: str | None) -> str:
    """The `compare` command for a run on the model `model_name`: a built-in model is found by itself; any
    other must be named with --model."""
    command = f"python -m ti_trainer compare {run_folder}"
    return command if built_in_model(model_name) else f"{command} --model <your {model_name} checkpoint>"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_backend(
    model: str = TINY, device: str = "auto", parameterization: str | None = None
) -> DiffusersBackend:
    """`model` is "tiny" (SD 2.x-like), "tiny-sdxl", a diffusers folder, or a single-file .safetensors/.ckpt
    checkpoint (SD 1.x, 2.x or SDXL)."""
    target = resolve_device(device)
    if model == TINY:
        from ti_trainer.backends.tiny import tiny_backend

        return tiny_backend(parameterization or "v", device=target)
    if model == TINY_SDXL:
        from ti_trainer.backends.tiny_xl import tiny_xl_backend

        return tiny_xl_backend(device=target)
    path = Path(model)
    if not path.exists():
        raise UserError(
            f"Model not found: {model}. Give a checkpoint file, a diffusers folder, 'tiny' or 'tiny-sdxl'."
        )
    return _load_pipeline_backend(path, target, parameterization)


def is_sdxl_model(path: Path) -> bool:
    """A diffusers folder with `text_encoder_2`, or a .safetensors checkpoint holding sgm's conditioner with
    bigG (what A1111 loads with sd_xl_base.yaml). Other single files (.ckpt) are read as SD 1.x/2.x: SDXL
    checkpoints are published as .safetensors."""
    if path.is_dir():
        return (path / "text_encoder_2").is_dir()
    if path.suffix.lower() != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return SDXL_CHECKPOINT_KEY in handle.keys()  # noqa: SIM118
    except Exception:  # not readable as safetensors: diffusers' loader says why below
        return False


def _load_pipeline_backend(
    path: Path, device: torch.device, parameterization: str | None
) -> DiffusersBackend:
    try:
        import diffusers
    except ImportError as error:
        raise UserError(
            "The standalone trainer needs diffusers and transformers: pip install 'ti_trainer[standalone]'"
        ) from error
    sdxl = is_sdxl_model(path)
    try:
        if sdxl:
            pipeline = diffusers.StableDiffusionXLPipeline
            pipe = (
                pipeline.from_pretrained(str(path), local_files_only=True)
                if path.is_dir()
                else pipeline.from_single_file(str(path))
            )
        elif path.is_dir():
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                str(path), safety_checker=None, requires_safety_checker=False, local_files_only=True
            )
        else:
            pipe = diffusers.StableDiffusionPipeline.from_single_file(str(path))
    except Exception as error:  # diffusers raises many types; the user needs the reason, not the class
        raise UserError(
            f"Could not load {path}: {error}. A single-file checkpoint needs its model configuration, which "
            "diffusers fetches from the Hugging Face hub the first time; load it once online, or convert it to "
            "a diffusers folder and pass that folder."
        ) from error
    if sdxl:
        return xl_pipeline_backend(pipe, path, device, parameterization)
    return pipeline_backend(pipe, path, device, parameterization)


def xl_pipeline_backend(pipe, source: Path, device: torch.device, parameterization: str | None):
    """The SDXL backend over a `StableDiffusionXLPipeline`'s components."""
    from ti_trainer.backends.diffusers_xl_backend import DiffusersXLBackend

    schedule, ids = _schedule_and_ids(pipe, parameterization)
    # bigG's tokenizer pads with "!" (id 0) after the end token, as open_clip and A1111 do.
    pad_2 = pipe.tokenizer_2.pad_token_id
    return DiffusersXLBackend(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.text_encoder_2,
        reference_tokenizer(pipe.tokenizer),
        TokenIds(ids.start, ids.end, ids.end, ids.comma),  # CLIP-L pads with the end token
        schedule,
        model_name=source.stem.replace("/", "_"),
        model_hash=checkpoint_short_hash(source) if source.is_file() else None,
        device=device,
        pad_2=0 if pad_2 is None else int(pad_2),
    )


def _schedule_and_ids(pipe, parameterization: str | None):
    from ti_trainer.diffusion import NoiseSchedule

    tokenizer = pipe.tokenizer
    prediction = parameterization or (
        "v" if pipe.scheduler.config.get("prediction_type") == "v_prediction" else "eps"
    )
    alphas = torch.as_tensor(pipe.scheduler.alphas_cumprod, dtype=torch.float64)
    vocab = tokenizer.get_vocab()
    ids = TokenIds(
        start=tokenizer.bos_token_id,
        end=tokenizer.eos_token_id,
        # SD 2.x tokenizers pad with "!" (id 0), which is what A1111 puts after the end token; SD 1.x pads
        # with the end token itself.
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        comma=vocab.get(",</w>", -1),
    )
    return NoiseSchedule(alphas, prediction), ids


def pipeline_backend(
    pipe, source: Path, device: torch.device, parameterization: str | None
) -> DiffusersBackend:
    from ti_trainer.backends.diffusers_backend import DiffusersBackend

    schedule, ids = _schedule_and_ids(pipe, parameterization)
    return DiffusersBackend(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        reference_tokenizer(pipe.tokenizer),
        ids,
        schedule,
        # diffusers stores SD 2.x's text encoder already cut at OpenCLIP's penultimate layer (23 of 24), so
        # its last hidden state (with the final norm) is what A1111 computes with `layer: penultimate`.
        penultimate=False,
        model_name=source.stem.replace("/", "_"),
        model_hash=checkpoint_short_hash(source) if source.is_file() else None,
        device=device,
        # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0) after the end token; SD 1.x's CLIP with the end.
        family="sd2" if ids.pad != ids.end else "sd1",
    )


def reference_tokenizer(tokenizer):
    """Tokenize with CLIP's reference BPE over the model's own vocabulary, as A1111 (open_clip) does.

    transformers' CLIPTokenizer agrees with it on words but not everywhere (5.x encodes a final "!" as "!"
    where CLIP gives "!</w>"), and a different token means a different conditioning than in the WebUI.
    Falls back to the model's tokenizer when its vocabulary files cannot be found.
    """
    from ti_trainer.backends.clip_bpe import ClipBpeTokenizer

    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if vocab.is_file() and merges.is_file():
        return ClipBpeTokenizer.from_files(vocab, merges)
    if (folder / "tokenizer.json").is_file():
        return ClipBpeTokenizer.from_tokenizer_json(folder / "tokenizer.json")

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"] for text in texts]

    return tokenize


def checkpoint_short_hash(path: Path) -> str:
    """A1111's checkpoint short hash: the first 10 hex digits of the file's sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]
