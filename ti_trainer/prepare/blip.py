"""BLIP captions through transformers, with the weights downloaded once into the host's models folder.

Loading is explicit and lazy: nothing downloads on import (DESIGN invariant 5). The first use of a model
prints where its weights go. When the model is neither a folder nor in the cache, whether it can be
downloaded is found out at once (offline mode, or a connection check of a few seconds) before any image is
touched: offline, the Hub's client would otherwise retry for minutes after announcing a 1 GB download.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ti_trainer.errors import UserError

DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-base"
# Short captions suit TI: the artist edits them down to what is incidental, so fewer words is less work.
_MAX_NEW_TOKENS = 30
_NUM_BEAMS = 3
# Long enough for a slow connection to answer, short enough that "no network" is a prompt answer.
_CONNECT_TIMEOUT_S = 3.0
_HOW_TO_GO_ON = (
    "To go on without it: prepare the images without captioning (leave BLIP unticked, or drop --caption) "
    "and write the captions in the caption editor of the Prepare tab; or give the path of a folder that "
    "holds a downloaded BLIP model as the model name (--blip-model)."
)


class BlipCaptioner:
    """image -> caption with a loaded BLIP model; call `close()` to free its memory."""

    def __init__(
        self,
        model,
        processor,
        device: str,
        max_new_tokens: int = _MAX_NEW_TOKENS,
        num_beams: int = _NUM_BEAMS,
    ):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams

    def __call__(self, image: Image.Image) -> str:
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        return self.processor.decode(ids[0], skip_special_tokens=True).strip()

    def close(self) -> None:
        self.model = None
        self.processor = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def load_blip_captioner(
    model_name: str = DEFAULT_BLIP_MODEL,
    models_dir: Path | None = None,
    device: str = "auto",
    on_message: Callable[[str], None] = print,
    max_new_tokens: int = _MAX_NEW_TOKENS,
    num_beams: int = _NUM_BEAMS,
) -> BlipCaptioner:
    """Load BLIP from `models_dir` (a Hub name) or from a folder path, downloading on first use."""
    model_name = (model_name or DEFAULT_BLIP_MODEL).strip()
    cache_dir = Path(models_dir) if models_dir else None
    device = _resolve_device(device)
    try:
        model, processor = _from_pretrained(model_name, cache_dir, local_files_only=True)
    except Exception as exc:
        if Path(model_name).is_dir():
            raise UserError(
                f"The folder {model_name} does not hold a BLIP captioning model ({_root_reason(exc)}). "
                f"Give a folder saved with save_pretrained, or a model name such as {DEFAULT_BLIP_MODEL}."
            ) from exc
        where = cache_dir or "the Hugging Face cache"
        _require_download_possible(model_name, where)
        on_message(
            f"Downloading the captioning model {model_name} into {where} (about 1 GB, only the first time)..."
        )
        try:
            model, processor = _from_pretrained(model_name, cache_dir, local_files_only=False)
        except Exception as download_exc:
            raise UserError(_download_failure(model_name, where, download_exc)) from download_exc
        on_message(f"Downloaded {model_name}.")
    model.to(device)
    if device.startswith("cuda"):
        model.half()
    model.eval()
    return BlipCaptioner(model, processor, device, max_new_tokens, num_beams)


def _from_pretrained(model_name: str, cache_dir: Path | None, local_files_only: bool):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    options = {"cache_dir": str(cache_dir) if cache_dir else None, "local_files_only": local_files_only}
    processor = BlipProcessor.from_pretrained(model_name, **options)
    model = BlipForConditionalGeneration.from_pretrained(model_name, **options)
    return model, processor


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _require_download_possible(model_name: str, where: object) -> None:
    """UserError at once when the model cannot be downloaded: offline mode, or the Hub does not answer."""
    if _hub_offline():
        why = (
            "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set), so nothing may be downloaded"
        )
    else:
        endpoint = _hub_endpoint()
        problem = hub_unreachable(endpoint)
        if problem is None:
            return
        why = f"{endpoint} cannot be reached ({problem}): no network connection?"
    raise UserError(f"The captioning model {model_name!r} is not in {where}, and {why}. {_HOW_TO_GO_ON}")


def hub_unreachable(endpoint: str, timeout: float = _CONNECT_TIMEOUT_S) -> str | None:
    """Why `endpoint` cannot be reached within `timeout` seconds, or None when it answers at all.

    Any HTTP answer, an error status included, means the network is there; the system's proxy settings
    are used, as the download itself would.
    """
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:  # timeouts, resets; ValueError: a malformed HF_ENDPOINT
        return str(exc) or type(exc).__name__


def _hub_endpoint() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "").strip()
    if endpoint:
        return endpoint
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # transformers cannot download without it either; its own error will say so
        return "https://huggingface.co"


def _download_failure(model_name: str, where: object, exc: Exception) -> str:
    if _hub_offline():
        why = (
            "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set), so nothing may be downloaded"
        )
    elif _caused_by(exc, "RepositoryNotFoundError"):
        why = f"there is no model of that name on the Hugging Face Hub (the default is {DEFAULT_BLIP_MODEL})"
    else:
        why = f"the Hugging Face Hub could not be reached ({_root_reason(exc)})"
    return (
        f"Could not load the captioning model {model_name!r}: it is not in {where} and {why}. "
        f"Connect to the internet once so it can be downloaded there. {_HOW_TO_GO_ON}"
    )


def _hub_offline() -> bool:
    flags = (os.environ.get(name, "") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _caused_by(exc: BaseException, type_name: str) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ == type_name for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _root_reason(exc: BaseException) -> str:
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
