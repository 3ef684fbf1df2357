"""Create embedding: a name checked as you type, the initialization text's token count, the prompt budget.

The handlers are plain functions of the host services and the field values; `build_create_panel` only lays
out components and wires them to the handlers.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gradio as gr

from ti_trainer.embeddings.init_text import init_mapping
from ti_trainer.errors import UserError
from ti_trainer.fsutil import validate_embedding_name
from ti_trainer.ui.common import note, notes

if TYPE_CHECKING:
    from ti_trainer.host.base import HostServices

CHUNK_TOKENS = 75  # tokens in one prompt chunk (conditioning.CHUNK_LENGTH)
MAX_VECTORS = 75  # create.MAX_VECTORS


def name_status(services: HostServices, name: str) -> str:
    """Is the name usable, and is it taken?"""
    if not (name or "").strip():
        return note("info", "The name is the word you will write in prompts, e.g. my-style.")
    try:
        cleaned = validate_embedding_name(name)
    except UserError as error:
        return note("error", str(error))
    from ti_trainer.embeddings.create import existing_embedding_file

    existing = existing_embedding_file(services.embeddings_dir, cleaned)
    if existing is not None:
        return note(
            "warn",
            f"{cleaned} already exists ({existing.name}). Tick 'Overwrite old embedding' to start it over, "
            "or train it further on the Train tab.",
        )
    return note("ok", f"{cleaned} is free. You will write it in prompts as: {cleaned}")


def init_text_status(services: HostServices, init_text: str, vectors: int) -> str:
    """The initialization text's token count, how it maps onto the vectors, and the prompt budget left."""
    vectors = int(vectors)
    items = []
    if not (init_text or "").strip():
        items.append(("info", init_mapping(0, vectors)))
    else:
        try:
            tokens, _ = services.get_backend().prompt_encoder.chunker.token_count(init_text)
        except Exception as error:  # the model may not be loaded yet; the count is a help, not a must
            tokens = None
            items.append(("warn", f"Could not count tokens: {error}"))
        if tokens is not None:
            items.append(("info", init_mapping(tokens, vectors)))
            backend = services.get_backend()
            if backend.family.vectors_per_encoder:  # SDXL: each encoder's vectors start from its own tokens
                from ti_trainer.embeddings.create import init_token_counts, per_encoder_count_line

                items.append(("info", per_encoder_count_line(init_token_counts(backend, init_text))))
    return notes([*items, budget_note(vectors)])


def budget_note(vectors: int) -> tuple[str, str]:
    left = CHUNK_TOKENS - int(vectors)
    return (
        "warn" if left < CHUNK_TOKENS // 3 else "info",
        f"In a prompt the embedding takes {int(vectors)} of the {CHUNK_TOKENS} tokens of a prompt chunk: "
        f"{left} are left for the rest of your prompt before it spills into a second chunk.",
    )


def create_embedding_job(
    services: HostServices, name: str, init_text: str, vectors: int, overwrite: bool
) -> tuple[str, str]:
    """The Create button: (result message, refreshed name status)."""
    from ti_trainer.embeddings.create import create_embedding

    try:
        backend = services.get_backend()
        path = create_embedding(
            backend, name, init_text or "", int(vectors), services.embeddings_dir, bool(overwrite)
        )
    except UserError as error:
        return note("error", str(error)), name_status(services, name)
    except Exception as error:  # shown to the artist; the traceback goes to the console for a bug report
        traceback.print_exc()
        return note("error", f"Could not create the embedding: {error}"), name_status(services, name)
    services.refresh_embeddings()
    message = f"Created {path.name} in {path.parent} ({int(vectors)} vector{'s' * (int(vectors) > 1)})."
    return note("ok", message), note("ok", f"{path.stem} is ready: train it on the Train tab.")


@dataclass
class CreatePanel:
    name: gr.Textbox
    created: object  # the Create click's event: chain `.then(...)` to act on a new embedding
    result: gr.HTML


def build_create_panel(services: HostServices) -> CreatePanel:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            name = gr.Textbox(
                label="Name", placeholder="my-style", max_lines=1, elem_id="ti_trainer_create_name"
            )
            name_info = gr.HTML(name_status(services, ""), elem_id="ti_trainer_create_name_status")
            init_text = gr.Textbox(
                label="Initialization text", value="*", max_lines=1, elem_id="ti_trainer_create_init_text"
            )
            vectors = gr.Slider(
                label="Number of vectors per token",
                minimum=1,
                maximum=MAX_VECTORS,
                step=1,
                value=1,
                elem_id="ti_trainer_create_vectors",
            )
            init_info = gr.HTML(notes([budget_note(1)]), elem_id="ti_trainer_create_init_status")
            overwrite = gr.Checkbox(label="Overwrite old embedding", elem_id="ti_trainer_create_overwrite")
            with gr.Row():
                create_button = gr.Button(
                    "Create embedding", variant="primary", elem_id="ti_trainer_create_button"
                )
        with gr.Column(scale=2):
            result = gr.HTML(elem_id="ti_trainer_create_result")

    name.change(lambda text: name_status(services, text), [name], [name_info], queue=False)
    for source in (init_text, vectors):
        source.change(
            lambda text, count: init_text_status(services, text, count), [init_text, vectors], [init_info]
        )
    created = create_button.click(
        lambda *args: create_embedding_job(services, *args),
        [name, init_text, vectors, overwrite],
        [result, name_info],
    )
    return CreatePanel(name, created, result)
