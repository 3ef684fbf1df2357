"""The "Prepare dataset" panel: prepare images, edit captions, lint them, and the dataset report.

Gradio is imported only inside `build_prepare_panel`, and only calls that Gradio 3.41 (A1111's) and 4.40
(Forge's) both take are made (ui/compat.py where they differ). Every handler is a plain module-level function over plain values, so it is tested
without a browser; updates are returned as Gradio's update dictionaries. The work itself is done by
ti_trainer.prepare: this module holds no image logic.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial
from html import escape
from pathlib import Path

from ti_trainer.errors import UserError
from ti_trainer.host.base import HostServices
from ti_trainer.prepare.blip import DEFAULT_BLIP_MODEL
from ti_trainer.prepare.captioners import build_captioner, captioner_labels
from ti_trainer.prepare.captions import (
    EXISTING_CAPTION_ACTIONS,
    caption_listing,
    find_and_replace,
    read_caption,
    save_caption,
)
from ti_trainer.prepare.focal import FocalWeights
from ti_trainer.prepare.geometry import FLIPS
from ti_trainer.prepare.lint import TokenBudget, lint_dataset, token_counter
from ti_trainer.prepare.preprocess import CROP_MODES, PrepareOptions, prepare_dataset
from ti_trainer.prepare.report import build_report
from ti_trainer.prepare.report_format import lint_text, report_html
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR, list_templates, read_template
from ti_trainer.ui.common import note, template_names
from ti_trainer.ui.compat import update as _update

PAGE_SIZE = 12  # caption slots on one page of the editor: Gradio 3 cannot add components at run time
_COLUMNS = 4
_POLL_SECONDS = 0.5


# --- preparing ---------------------------------------------------------------------------------------------


@dataclass
class Interrupt:
    """The panel's Interrupt button: asks a running preparation to stop after the current image."""

    event: threading.Event = field(default_factory=threading.Event)

    def request(self) -> str:
        self.event.set()
        return "Stopping after the current image..."


@dataclass
class _Run:
    lines: list[str] = field(default_factory=list)
    progress: str = ""
    done: bool = False


def run_prepare(
    services: HostServices,
    interrupt: Interrupt,
    source: str,
    dest: str,
    size: float,
    crop: str,
    faces_weight: float,
    entropy_weight: float,
    edges_weight: float,
    split: bool,
    split_threshold: float,
    split_overlap: float,
    flips: list[str],
    captioners: list[str],
    blip_model: str,
    existing_caption: str,
):
    """Generator for the Prepare button: yields (log text, editor folder, report folder) while it works.

    The work runs in a thread so the log can refresh; when it ends the editor and the report point at `dest`.
    """
    interrupt.event.clear()
    run = _Run()
    options = PrepareOptions(
        size=int(size),
        crop=crop,
        focal=FocalWeights(faces_weight, entropy_weight, edges_weight),
        split=bool(split),
        split_threshold=float(split_threshold),
        split_overlap=float(split_overlap),
        flips=tuple(flips or ()),
        existing_caption=existing_caption,
    )

    def work() -> None:
        captioner = None
        try:
            captioner = build_captioner(
                list(captioners or []), services.captioners, blip_model, services.models_dir, run.lines.append
            )
            result = prepare_dataset(
                Path(source.strip()),
                Path(dest.strip()),
                options,
                captioner,
                progress=lambda done, total, name: setattr(run, "progress", f"{done}/{total} {name}"),
                should_stop=interrupt.event.is_set,
            )
            run.lines += result.lines()
        except UserError as error:
            run.lines.append(f"Error: {error}")
        except Exception as error:  # shown in the panel, not lost in the console
            run.lines.append(f"Unexpected error ({type(error).__name__}): {error}")
        finally:
            if captioner is not None:
                captioner.close()  # BLIP's memory goes back to the WebUI's model
            run.done = True

    if not source.strip() or not dest.strip():
        yield "Give a source folder and a destination folder.", _update(), _update()
        return
    thread = threading.Thread(target=work, name="ti_trainer-prepare", daemon=True)
    thread.start()
    while not run.done:
        time.sleep(_POLL_SECONDS)
        yield "\n".join([f"Preparing {run.progress}", *run.lines]), _update(), _update()
    thread.join()
    yield "\n".join(run.lines), _update(value=dest.strip()), _update(value=dest.strip())


# --- caption editor ----------------------------------------------------------------------------------------


def load_caption_page(folder: str, page: float) -> list:
    """[names on the page, page number, status, then an image and a caption update per slot]."""
    try:
        listing = caption_listing(Path(folder.strip()))
    except UserError as error:
        return [[], 1, f"Error: {error}", *_empty_slots()]
    entries = listing.entries
    pages = max(1, -(-len(entries) // PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    shown = entries[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    slots: list[dict] = []
    for entry in shown:
        label = entry.image.name if entry.has_file else f"{entry.image.name} (no caption file yet)"
        slots.append(_update(value=str(entry.image), label=entry.image.name, visible=True))
        slots.append(_update(value=entry.caption if entry.has_file else "", label=label, visible=True))
    slots += _empty_slots()[len(slots) :]
    status = f"Page {page} of {pages}: images {(page - 1) * PAGE_SIZE + 1}-{(page - 1) * PAGE_SIZE + len(shown)} of {len(entries)}."
    if listing.skipped:
        status += " Skipped: " + "; ".join(f"{p.path.name} ({p.reason})" for p in listing.skipped) + "."
    return [[entry.image.name for entry in shown], page, status, *slots]


def previous_page(folder: str, page: float) -> list:
    return load_caption_page(folder, (page or 1) - 1)


def next_page(folder: str, page: float) -> list:
    return load_caption_page(folder, (page or 1) + 1)


def _empty_slots() -> list[dict]:
    return [_update(value=None, visible=False) for _ in range(2 * PAGE_SIZE)]


def save_caption_page(folder: str, names: list[str], *captions: str) -> str:
    """Save the captions shown on the page that differ from their files; says how many were written."""
    saved = []
    try:
        for name, text in zip(names or [], captions):
            current = read_caption(Path(folder.strip()) / name)
            if (current or "") != (text or "").strip() or (current is None and text.strip()):
                save_caption(Path(folder.strip()), name, text)
                saved.append(name)
    except UserError as error:
        return f"Error: {error}"
    return f"Saved {len(saved)} caption{'s' if len(saved) != 1 else ''}" + (
        f": {', '.join(saved)}" if saved else "."
    )


def replace_in_captions(
    folder: str, page: float, find: str, replace: str, regex: bool, match_case: bool, whole_words: bool
) -> list:
    """Find and replace across every caption file, then show the page again with the count as status."""
    try:
        result = find_and_replace(
            Path(folder.strip()),
            find,
            replace or "",
            regex=regex,
            match_case=match_case,
            whole_words=whole_words,
        )
        status = f"Replaced {result.replacements} times in {len(result.changed)} caption files."
    except UserError as error:
        status = f"Error: {error}"
    outputs = load_caption_page(folder, page)
    outputs[2] = status
    return outputs


def check_captions(
    services: HostServices, folder: str, init_text: str, template: str, name: str, vectors: float
) -> str:
    """The lint as HTML: init-text words, empty captions, token budget, near-duplicates."""
    try:
        listing = caption_listing(Path(folder.strip()))
        budget, budget_note = _token_budget(services, template, name, int(vectors or 1))
        report = lint_dataset(listing.entries, init_text or "", budget, skipped=listing.skipped)
    except UserError as error:
        return note("error", str(error))
    if budget_note:
        report.notes.append(budget_note)
    return f"<pre style='white-space:pre-wrap'>{escape(lint_text(report))}</pre>"


def _token_budget(services: HostServices, template: str, name: str, vectors: int):
    """A TokenBudget over the host's model's tokenizer, or (None, why not)."""
    templates = list_templates(*services.templates_dirs, BUILTIN_TEMPLATES_DIR)
    if template not in templates:
        return None, f"Template {template!r} not found: the token budget was not checked."
    try:
        chunker = services.get_backend().prompt_encoder.chunker
    except Exception as error:  # no model loaded, or a host without one: lint the rest anyway
        return None, f"No model to count tokens with ({error}): the token budget was not checked."
    lines = read_template(templates[template]).lines
    label = (name or "").strip() or "embedding"
    return TokenBudget(lines, label, token_counter(chunker, label, vectors)), ""


# --- report ------------------------------------------------------------------------------------------------


def run_report(folder: str, size: float, max_batch: float) -> str:
    try:
        return report_html(build_report(Path(folder.strip()), int(size) or None, int(max_batch or 8)))
    except UserError as error:
        return note("error", str(error))


# --- layout ------------------------------------------------------------------------------------------------


def build_prepare_panel(services: HostServices) -> None:
    """Create the panel's components inside the caller's current gr.Blocks / gr.Tab context."""
    import gradio as gr

    interrupt = Interrupt()
    with gr.Accordion("Prepare images", open=True):
        with gr.Row():
            source = gr.Textbox(label="Source folder (only read, never changed)")
            dest = gr.Textbox(label="Destination folder (the prepared dataset)")
        with gr.Row():
            size = gr.Slider(
                64, 2048, value=512, step=64, label="Output size (px): 512 for SD 2.x base, 768 for 768-v"
            )
            crop = gr.Radio(
                list(CROP_MODES),
                value="center",
                label="Crop: center, focal point, or keep aspect ratio (buckets)",
            )
        with gr.Accordion("Focal point weights", open=False), gr.Row():
            faces = gr.Slider(0.0, 1.0, value=0.9, step=0.05, label="Faces")
            entropy = gr.Slider(0.0, 1.0, value=0.15, step=0.05, label="Detail (entropy)")
            edges = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Edges")
        with gr.Row():
            split = gr.Checkbox(value=False, label="Split oversized images into tiles")
            threshold = gr.Slider(
                0.05, 1.0, value=0.5, step=0.05, label="Split when short/long side is at most"
            )
            overlap = gr.Slider(0.0, 0.9, value=0.2, step=0.05, label="Tile overlap")
        flips = gr.CheckboxGroup(list(FLIPS), value=[], label="Flipped copies")
        with gr.Row():
            captioners = gr.CheckboxGroup(
                captioner_labels(services.captioners), value=[], label="Caption with"
            )
            blip_model = gr.Textbox(value=DEFAULT_BLIP_MODEL, label="BLIP model (name or folder)")
            existing = gr.Radio(list(EXISTING_CAPTION_ACTIONS), value="keep", label="Existing caption files")
        with gr.Row():
            prepare_button = gr.Button("Prepare", variant="primary")
            interrupt_button = gr.Button("Interrupt")
        prepare_log = gr.Textbox(label="Progress, skipped and flagged files", lines=8, interactive=False)

    with gr.Accordion("Captions", open=True):
        with gr.Row():
            folder = gr.Textbox(label="Dataset folder", scale=4)
            page = gr.Number(value=1, precision=0, label="Page", scale=1)
        with gr.Row():
            load_button = gr.Button("Load")
            previous_button = gr.Button("◀ Previous page")
            next_button = gr.Button("Next page ▶")
            save_button = gr.Button("Save captions", variant="primary")
        editor_status = gr.Markdown()
        names = gr.State([])
        slots = []
        for row_start in range(0, PAGE_SIZE, _COLUMNS):
            with gr.Row():
                for _ in range(row_start, row_start + _COLUMNS):
                    with gr.Column(min_width=160):
                        image = gr.Image(type="filepath", interactive=False, visible=False)
                        caption = gr.Textbox(lines=3, visible=False)
                        slots += [image, caption]
        with gr.Row():
            find = gr.Textbox(label="Find")
            replace = gr.Textbox(label="Replace with")
            regex = gr.Checkbox(value=False, label="Regular expression")
            match_case = gr.Checkbox(value=False, label="Match case")
            whole_words = gr.Checkbox(value=True, label="Whole words")
            replace_button = gr.Button("Replace in all captions")
        with gr.Row():
            init_text = gr.Textbox(
                label="Initialization text of the embedding (its words should not be in captions)"
            )
            templates = template_names(services)
            template = gr.Dropdown(
                templates,
                value="style_filewords.txt" if "style_filewords.txt" in templates else None,
                label="Template",
            )
            embedding_name = gr.Textbox(value="", label="Embedding name")
            vectors = gr.Number(value=1, precision=0, label="Vectors per token")
            check_button = gr.Button("Check captions")
        lint_output = gr.HTML()

    with gr.Accordion("Dataset report", open=True):
        with gr.Row():
            report_folder = gr.Textbox(label="Dataset folder", scale=4)
            report_size = gr.Number(value=512, precision=0, label="Training size (px)")
            max_batch = gr.Number(value=8, precision=0, label="Largest batch size")
            report_button = gr.Button("Report")
        report_output = gr.HTML()

    page_outputs = [names, page, editor_status, *slots]
    captions_only = slots[1::2]
    prepare_button.click(
        partial(run_prepare, services, interrupt),
        inputs=[
            source,
            dest,
            size,
            crop,
            faces,
            entropy,
            edges,
            split,
            threshold,
            overlap,
            flips,
            captioners,
            blip_model,
            existing,
        ],
        outputs=[prepare_log, folder, report_folder],
    ).then(load_caption_page, inputs=[folder, page], outputs=page_outputs)
    interrupt_button.click(interrupt.request, inputs=[], outputs=[prepare_log])
    load_button.click(load_caption_page, inputs=[folder, page], outputs=page_outputs)
    previous_button.click(previous_page, inputs=[folder, page], outputs=page_outputs)
    next_button.click(next_page, inputs=[folder, page], outputs=page_outputs)
    save_button.click(save_caption_page, inputs=[folder, names, *captions_only], outputs=[editor_status])
    replace_button.click(
        replace_in_captions,
        inputs=[folder, page, find, replace, regex, match_case, whole_words],
        outputs=page_outputs,
    )
    check_button.click(
        partial(check_captions, services),
        inputs=[folder, init_text, template, embedding_name, vectors],
        outputs=[lint_output],
    )
    report_button.click(run_report, inputs=[report_folder, report_size, max_batch], outputs=[report_output])
