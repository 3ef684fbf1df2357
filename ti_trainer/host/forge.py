"""The Forge host (lllyasviel/stable-diffusion-webui-forge): with host/a1111.py, the only modules of ti_trainer
that import the WebUI's `modules.*` (and here Forge's `backend.*`).

What Forge keeps of A1111's extension API (reference/forge.md §6) is used the same way: `script_callbacks` for
the tab, the Settings page and the routes; `shared.state` for the progress bar and Interrupt; `call_queue`'s
lock for one GPU job at a time; `processing` for previews. What differs is the model: Forge's own classes
(`backend/diffusion_engine`), trained through backends/forge_backend.py (SD 1.x / 2.x) or
backends/forge_xl_backend.py (SDXL) under Forge's memory management, and text engines (SDXL: one per text
encoder) each with its own embedding database, filled once when the model loads: a new embedding is registered
in each so it is usable at once. scripts/ti_trainer_tab.py calls register_callbacks() when it finds Forge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from backend import memory_management
from backend.text_processing.textual_inversion import Embedding as ForgeEmbedding
from modules import call_queue, processing, progress, script_callbacks, sd_models, shared
from PIL import Image

from ti_trainer.backends.contract import CLIP_G, PreviewRequest
from ti_trainer.backends.forge_backend import ForgeBackend
from ti_trainer.backends.forge_xl_backend import ForgeXLBackend
from ti_trainer.embeddings.vectors import Vectors
from ti_trainer.errors import UserError
from ti_trainer.host import webui_settings
from ti_trainer.host.base import HostServices
from ti_trainer.host.webui_host import WebuiHost

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
        "forge", get_backend, render_preview, refresh_embeddings, caption_with_deepbooru
    )


def loaded_model():
    """Forge's model, loaded now if it is not yet: Forge loads the checkpoint lazily, at the first generation,
    and until then `shared.sd_model` is a placeholder without the model's parts."""
    if getattr(shared.sd_model, "forge_objects", None) is None:
        try:
            sd_models.forge_model_reload()
        except ValueError as error:  # Forge's "You do not have any model!"
            raise UserError(f"{error} Then pick it in the checkpoint list at the top of the page.") from error
    return shared.sd_model


def estimated_step_room(plan, latent_shape: tuple[int, ...], backend) -> int:
    """The room a training step needs beyond the weights, from the VRAM estimate (vram/for_config.py
    `step_room_bytes`, imported when first asked: it builds models on the meta device)."""
    from ti_trainer.vram.for_config import step_room_bytes

    return step_room_bytes(plan, latent_shape, backend)


def get_backend() -> ForgeBackend | ForgeXLBackend:
    """The loaded model, trained in place through Forge's memory management (no second copy): SDXL by
    ForgeXLBackend (with Forge's crop settings), SD 1.x / 2.x by ForgeBackend."""
    model = loaded_model()
    checkpoint = getattr(model, "sd_checkpoint_info", None)
    settings = dict(
        emphasis=str(shared.opts.emphasis),
        clip_skip=int(shared.opts.CLIP_stop_at_last_layers),
        model_name=getattr(checkpoint, "model_name", "") or "",
        model_hash=getattr(checkpoint, "shorthash", None),
        # The room asked of Forge for a step's backward pass: the VRAM estimate (docs/benchmarks.md)
        step_memory=estimated_step_room,
    )
    if getattr(model, "is_sdxl", False):
        crop = (int(shared.opts.sdxl_crop_top), int(shared.opts.sdxl_crop_left))
        return ForgeXLBackend(model, memory_management, crop_top_left=crop, **settings)
    return ForgeBackend(model, memory_management, **settings)


TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def text_engines(model) -> list:
    """The model's text engines, each with its own embedding database (SD 1.x / 2.x: one; SDXL: clip_l's and
    clip_g's)."""
    return [getattr(model, name) for name in TEXT_ENGINES if getattr(model, name, None) is not None]


def render_preview(request: PreviewRequest) -> Image.Image | None:
    """A preview through Forge's txt2img, with the in-training vectors registered under their names in the
    engine's embedding database for the while; afterwards the database holds what it held before."""
    model = loaded_model()
    with registered_embeddings(request.vectors, text_engines(model)):
        return _webui.txt2img_preview(processing, model, request)


@contextlib.contextmanager
def registered_embeddings(vectors: dict[str, Vectors], engines: list) -> Iterator[None]:
    """Register embeddings in each engine's database for a while, then give each name back what it had."""
    databases = [engine.embeddings for engine in engines]
    previous = [{name: db.word_embeddings.get(name) for name in vectors} for db in databases]
    try:
        for db in databases:
            for name, values in vectors.items():
                db.register_embedding(forge_embedding(name, values))
        yield
    finally:
        for db, before in zip(databases, previous):
            for name, embedding in before.items():
                db.register_embedding_by_name(embedding, name)  # None unregisters


def forge_embedding(name: str, values: Vectors) -> ForgeEmbedding:
    """Vectors as Forge's loader makes an embedding of them: a tensor, or SDXL's dict (each engine takes its
    key's part); `vectors` is the positions it takes in a prompt (clip_g's rows), `shape` its width (summed)."""
    if isinstance(values, dict):
        vec = {key: tensor.detach().float().cpu() for key, tensor in values.items()}
        rows, width = vec[CLIP_G].shape[0], sum(tensor.shape[-1] for tensor in vec.values())
    else:
        vec = values.detach().float().cpu()
        rows, width = vec.shape[0], vec.shape[-1]
    embedding = ForgeEmbedding(vec, name)
    embedding.vectors, embedding.shape = int(rows), int(width)
    return embedding


def refresh_embeddings() -> None:
    """Make files just written to the embeddings folder usable at once: Forge fills each engine's database
    once, when the model loads, and never looks again; this reloads it from its folders the same way."""
    model = shared.sd_model
    if getattr(model, "forge_objects", None) is None:
        return  # not loaded yet: the files are read when it loads
    for engine in text_engines(model):
        engine.embeddings.load_textual_inversion_embeddings()


def caption_with_deepbooru(image: Image.Image) -> str:
    from modules import deepbooru

    return deepbooru.model.tag(image.convert("RGB"))
