"""The A1111 WebUI host: with host/forge.py, the only modules of ti_trainer that import the WebUI's
`modules.*`.

It gives the panels, the API and the training loop what the WebUI has: its folders (embeddings, templates),
its loaded model (an LdmBackend for SD 1.x/2.x, an SgmBackend for SDXL; trained in place), previews through its own txt2img processing, its queue,
progress bar and Interrupt, its captioners, and our defaults on its Settings page. scripts/ti_trainer_tab.py
calls register_callbacks() when the WebUI loads the extension.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from modules import call_queue, devices, processing, progress, script_callbacks, sd_hijack, shared
from modules.textual_inversion.textual_inversion import Embedding as WebUIEmbedding
from PIL import Image

from ti_trainer.backends.contract import PreviewRequest
from ti_trainer.backends.ldm_backend import LdmBackend
from ti_trainer.backends.sgm_backend import SgmBackend
from ti_trainer.embeddings.vectors import Vectors
from ti_trainer.errors import UserError
from ti_trainer.host import webui_settings
from ti_trainer.host.base import HostServices
from ti_trainer.host.webui_host import WebuiHost
from ti_trainer.text.conditioning import TextRules

# What this WebUI shares with the other (host/webui_host.py): jobs, progress, folders, flags, BLIP.
_webui = WebuiHost(shared, call_queue, progress)
run_exclusive = _webui.run_exclusive


def register_callbacks() -> None:
    script_callbacks.on_ui_tabs(ui_tabs)
    script_callbacks.on_ui_settings(add_settings)
    script_callbacks.on_app_started(add_api_routes)


# --- the three things the WebUI calls ------------------------------------------------------------------------


def ui_tabs() -> list[tuple[object, str, str]]:
    return _webui.ui_tabs(host_services())


def add_settings() -> None:
    webui_settings.add_settings(shared)


def add_api_routes(demo, app) -> None:
    _webui.add_api_routes(app, host_services)


# --- host services -------------------------------------------------------------------------------------------


def host_services() -> HostServices:
    return _webui.host_services(
        "a1111", get_backend, render_preview, refresh_embeddings, caption_with_deepbooru
    )


def get_backend() -> LdmBackend | SgmBackend:
    """The loaded model, trained in place (no second copy in memory)."""
    model = shared.sd_model
    if model is None:
        raise UserError(
            "No Stable Diffusion model is loaded. Pick one in the checkpoint list at the top of the WebUI."
        )
    if getattr(model, "is_sdxl", False):
        return sdxl_backend(model)
    checkpoint = getattr(model, "sd_checkpoint_info", None)
    return LdmBackend(
        model,
        devices.device,
        rules=TextRules(shared.opts.emphasis, int(shared.opts.comma_padding_backtrack)),
        clip_skip=int(shared.opts.CLIP_stop_at_last_layers),
        model_name=getattr(checkpoint, "model_name", "") or "",
        model_hash=getattr(checkpoint, "shorthash", None),
        # Under --medvram/--lowvram the trainer takes placement over while it runs and hands it back after.
        low_vram=bool(
            getattr(shared.cmd_opts, "medvram", False) or getattr(shared.cmd_opts, "lowvram", False)
        ),
        context_hook=hypernetwork_context_hook(),
    )


def sdxl_backend(model) -> SgmBackend:
    """The loaded SDXL with the WebUI's generation-time text and size settings, its placement (--medvram-sdxl
    and the like: `sd_model.lowvram`) and, with FP8 weight storage on, its autocast around every forward."""
    checkpoint = getattr(model, "sd_checkpoint_info", None)
    opts = shared.opts
    return SgmBackend(
        model,
        devices.device,
        rules=TextRules(opts.emphasis, int(opts.comma_padding_backtrack)),
        # "Clip skip SDXL": CLIP-L's layer counted from the end, as the WebUI's wrapper takes it.
        clip_l_layer_from_end=int(opts.CLIP_stop_at_last_layers) if opts.sdxl_clip_l_skip is True else None,
        crop_top_left=(int(opts.sdxl_crop_top), int(opts.sdxl_crop_left)),
        model_name=getattr(checkpoint, "model_name", "") or "",
        model_hash=getattr(checkpoint, "shorthash", None),
        low_vram=bool(getattr(model, "lowvram", False)),
        compute_context=devices.autocast if getattr(devices, "fp8", False) else None,
    )


def hypernetwork_context_hook():
    """The WebUI's loaded hypernetworks applied to the cross-attention context, as its own attention does;
    None when none are loaded (the usual case when training an embedding)."""
    loaded = getattr(shared, "loaded_hypernetworks", None)
    if not loaded:
        return None
    from modules.hypernetworks import hypernetwork

    return lambda context: hypernetwork.apply_hypernetworks(loaded, context)


def render_preview(request: PreviewRequest) -> Image.Image | None:
    """A preview through the WebUI's txt2img, with the in-training vectors registered under their names.

    `do_not_reload_embeddings` keeps the WebUI from replacing them with the files on disk; afterwards the
    embedding database holds exactly what it held before.
    """
    model = shared.sd_model
    with registered_embeddings(request.vectors, model):
        return _webui.txt2img_preview(processing, model, request, do_not_reload_embeddings=True)


@contextlib.contextmanager
def registered_embeddings(vectors: dict[str, Vectors], model) -> Iterator[None]:
    """Register embeddings in the WebUI's database for a while, then give each name back what it had."""
    database = sd_hijack.model_hijack.embedding_db
    previous = {name: database.word_embeddings.get(name) for name in vectors}
    try:
        for name, values in vectors.items():
            database.register_embedding_by_name(webui_embedding(name, values), model, name)
        yield
    finally:
        for name, embedding in previous.items():
            database.register_embedding_by_name(embedding, model, name)  # None unregisters


def webui_embedding(name: str, values: Vectors) -> WebUIEmbedding:
    """An embedding as the WebUI holds one it loaded: fp32 on its device; an SDXL one as its dict of
    `clip_l`/`clip_g` tensors, whose `vectors` are clip_g's rows and `shape` the widths' sum (A1111's
    create_embedding_from_data)."""
    if isinstance(values, dict):
        vec = {key: tensor.detach().to(devices.device, torch.float32) for key, tensor in values.items()}
        count, width = vec["clip_g"].shape[0], sum(tensor.shape[-1] for tensor in vec.values())
    else:
        vec = values.detach().to(devices.device, torch.float32)
        count, width = vec.shape[0], vec.shape[-1]
    embedding = WebUIEmbedding(vec, name)
    # The WebUI fills these when it loads a file; its prompt parser reserves `vectors` positions.
    embedding.vectors, embedding.shape = int(count), int(width)
    return embedding


def refresh_embeddings() -> None:
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)


def caption_with_deepbooru(image: Image.Image) -> str:
    from modules import deepbooru

    return deepbooru.model.tag(image.convert("RGB"))
