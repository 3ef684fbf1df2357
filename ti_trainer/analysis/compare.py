"""The comparison grid: rows = saved steps, columns = prompts, one click instead of an afternoon.

What the seeds' artist did by hand: copy many saved steps into the embeddings folder, run the same varied
prompts with each (a modern city, a still life, a fantasy creature, a landscape, a sci-fi space scene), and
look for the last step before the style "overbakes". Every cell is rendered with the same seed, so rows differ
only by the embedding. The prompts are saved per run, so the next grid of that run asks the same questions.
"""

from __future__ import annotations

import datetime
import json
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, PngImagePlugin

from ti_trainer.analysis.charts import font, text_width
from ti_trainer.analysis.run_files import COMPARE_DIR, COMPARE_SETTINGS_JSON, RunInfo
from ti_trainer.backends.contract import Backend, ModelFamily, PreviewRequest
from ti_trainer.config import size_problem
from ti_trainer.embeddings.files import load_embedding
from ti_trainer.errors import UserError
from ti_trainer.fsutil import atomic_write, atomic_write_text
from ti_trainer.text.templates import NAME_PLACEHOLDER

# The seeds' variety set, plus a portrait (their other test: can it paint people of any time and place?).
DEFAULT_PROMPTS = (
    "a modern city, [name]",
    "a still life, [name]",
    "a fantasy creature, [name]",
    "a landscape, [name]",
    "a sci-fi space scene, [name]",
    "a portrait of a person, [name]",
)
MAX_CELL_SIDE = 512  # cells are shrunk to this in the grid; the full-size renders are saved beside it
GRID_MARGIN = 28  # white above and beside the grid: Gradio lays its label and buttons over the corners
MAX_CELLS = 400  # a grid this large takes hours on an 8 GB card: refuse it with a clear message instead

Render = Callable[[PreviewRequest], Image.Image | None]


@dataclass
class CompareSettings:
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [1])
    width: int = 0  # 0: the run's training size
    height: int = 0
    sampler_steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "Euler a"

    def check(self) -> None:
        problems = []
        if not [p for p in self.prompts if p.strip()]:
            problems.append("Give at least one prompt (one per line), e.g. 'a landscape, [name]'.")
        if not self.seeds:
            problems.append("Give at least one seed, e.g. 1.")
        for label, value in (("Width", self.width), ("Height", self.height)):
            problem = size_problem(label, value, zero_means="the run's size")
            if problem:
                problems.append(problem)
        if self.sampler_steps < 1:
            problems.append(f"Sampling steps must be at least 1 (got {self.sampler_steps}).")
        if problems:
            raise UserError("\n".join(problems))


@dataclass
class Grid:
    path: Path
    image: Image.Image
    steps: list[int]
    row_labels: list[str]
    column_labels: list[str]
    cell_size: tuple[int, int]
    cells_folder: Path
    notes: list[str]


def load_settings(run: RunInfo) -> CompareSettings:
    """This run's saved comparison settings, or defaults taken from its preview settings."""
    path = run.root / COMPARE_SETTINGS_JSON
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            known = {key: data[key] for key in CompareSettings.__dataclass_fields__ if key in data}
            return CompareSettings(**known)
        except (OSError, json.JSONDecodeError, TypeError):
            pass  # unreadable: fall back to defaults; the next save rewrites it
    config = run.config
    return CompareSettings(
        negative_prompt=config.preview_negative_prompt,
        seeds=[config.preview_seed if config.preview_seed >= 0 else 1],
        width=config.preview_width or config.width,
        height=config.preview_height or config.height,
        sampler_steps=config.preview_steps,
        cfg_scale=config.preview_cfg_scale,
        sampler=config.preview_sampler,
    )


def save_settings(run: RunInfo, settings: CompareSettings) -> Path:
    return atomic_write_text(run.root / COMPARE_SETTINGS_JSON, json.dumps(asdict(settings), indent=2))


def parse_steps(text: str, available: list[int]) -> list[int]:
    """'100, 200-400' -> the saved steps listed or within the ranges; empty -> all saved steps."""
    text = (text or "").strip()
    if not text or text.lower() == "all":
        return list(available)
    chosen: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                chosen |= {s for s in available if low <= s <= high}
            else:
                step = int(part)
                if step not in available:
                    raise UserError(
                        f"Step {step} has no saved copy in this run. Saved steps: {', '.join(map(str, available))}."
                    )
                chosen.add(step)
        except ValueError as error:
            raise UserError(
                f"Could not read the steps {text!r}: use e.g. '100, 200-400' or 'all'."
            ) from error
    return sorted(chosen)


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError as error:
        raise UserError(f"Seeds must be whole numbers separated by commas (got {text!r}).") from error


def prompt_with_name(prompt: str, name: str) -> str:
    return prompt.replace(NAME_PLACEHOLDER, name)


def render_grid(
    run: RunInfo,
    settings: CompareSettings,
    render: Render,
    steps: list[int] | None = None,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    should_stop: Callable[[], bool] = lambda: False,
    family: ModelFamily | None = None,
) -> Grid:
    """Render every (step, prompt, seed) cell with `render` and save the labelled grid in the run's folder.

    `render` is the host's txt2img inside the WebUI, or the backend's sampler standalone; it receives the
    step's vectors under the run's embedding name, which the prompts contain. Every step's copy is read and
    checked against `family` (the rendering model's family, when known) before the first image.
    """
    settings.check()
    saved = run.saved_steps()
    steps = list(saved) if steps is None else steps
    if not steps:
        raise UserError(
            f"{run.root} has no saved steps (embeddings/{run.name}-<step>.pt). Train with 'save a copy every N "
            "steps' on to compare steps."
        )
    missing = [s for s in steps if s not in saved]
    if missing:
        raise UserError(
            f"No saved copy for step(s) {', '.join(map(str, missing))} in {run.embeddings_folder}."
        )
    prompts = [p.strip() for p in settings.prompts if p.strip()]
    columns = [(prompt, seed) for prompt in prompts for seed in settings.seeds]
    total = len(steps) * len(columns)
    if total > MAX_CELLS:
        raise UserError(
            f"That grid has {total} images ({len(steps)} steps x {len(columns)} prompt/seed columns); the most is "
            f"{MAX_CELLS}. Pick fewer steps (e.g. every other one) or fewer prompts."
        )
    notes = [
        f"The prompt {p!r} has no [name] and no {run.name!r}: the embedding is absent, so its column will not "
        "change from row to row."
        for p in prompts
        if NAME_PLACEHOLDER not in p and run.name not in p
    ]
    width = settings.width or run.config.width
    height = settings.height or run.config.height
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = run.root / COMPARE_DIR
    cells_folder = folder / f"{run.name}-{stamp}"
    cells: dict[tuple[int, int], Image.Image] = {}
    embeddings = run.step_embeddings(steps, family)
    done = 0
    for row, step in enumerate(steps):
        vectors = embeddings[step].vectors
        for column, (prompt, seed) in enumerate(columns):
            if should_stop():
                raise UserError(f"Comparison stopped after {done} of {total} images; nothing was saved.")
            request = PreviewRequest(
                prompt=prompt_with_name(prompt, run.name),
                negative_prompt=prompt_with_name(settings.negative_prompt, run.name),
                steps=settings.sampler_steps,
                cfg_scale=settings.cfg_scale,
                seed=seed,
                width=width,
                height=height,
                sampler=settings.sampler,
                vectors={run.name: vectors},
            )
            image = render(request)
            if image is None:
                raise UserError(
                    "The image generator returned nothing (was it interrupted?). Nothing was saved."
                )
            cells[(row, column)] = image.convert("RGB")
            cell_path = cells_folder / f"step{step}-prompt{prompts.index(prompt) + 1}-seed{seed}.png"
            atomic_write(cell_path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            done += 1
            on_progress(done, total)

    multiple_seeds = len(settings.seeds) > 1
    column_labels = [
        prompt_with_name(prompt, run.name) + (f" (seed {seed})" if multiple_seeds else "")
        for prompt, seed in columns
    ]
    suggested = run.summary().get("suggested_step")
    row_labels = [f"step {step}" + (" (suggested)" if step == suggested else "") for step in steps]
    grid_image = compose(cells, row_labels, column_labels, (width, height))
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "ti_trainer_compare",
        json.dumps(
            {
                "run": str(run.root),
                "steps": steps,
                "rows": row_labels,
                "columns": column_labels,
                **asdict(settings),
            }
        ),
    )
    path = folder / f"{run.name}-compare-{stamp}.png"
    atomic_write(path, lambda tmp: grid_image.save(tmp, format="PNG", pnginfo=info))
    save_settings(run, settings)
    cell_size = _cell_size((width, height))
    return Grid(path, grid_image, steps, row_labels, column_labels, cell_size, cells_folder, notes)


def _cell_size(size: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    scale = min(1.0, MAX_CELL_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def compose(
    cells: dict[tuple[int, int], Image.Image],
    row_labels: list[str],
    column_labels: list[str],
    render_size: tuple[int, int],
) -> Image.Image:
    """The labelled grid: a header row of prompts, a first column of steps, the cells in between."""
    cell_w, cell_h = _cell_size(render_size)
    label_font = font(14 if cell_w >= 192 else 11)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_label_w = 16 + max(text_width(scratch, label, label_font) for label in row_labels)
    column_w = max(cell_w, 96)  # small renders still get a readable prompt column
    wrapped = [_wrap(scratch, label, label_font, column_w - 8) for label in column_labels]
    line_h = scratch.textbbox((0, 0), "Ag", font=label_font)[3] + 4
    header_h = GRID_MARGIN + 12 + line_h * max(len(lines) for lines in wrapped)
    width = row_label_w + column_w * len(column_labels) + GRID_MARGIN // 2
    height = header_h + cell_h * len(row_labels)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(wrapped):
        x = row_label_w + column * column_w + 4
        for index, line in enumerate(lines):
            draw.text((x, GRID_MARGIN + 6 + index * line_h), line, fill=(30, 30, 30), font=label_font)
    for row, label in enumerate(row_labels):
        y = header_h + row * cell_h
        draw.text((8, y + cell_h // 2 - line_h // 2), label, fill=(30, 30, 30), font=label_font)
        for column in range(len(column_labels)):
            cell = cells[(row, column)]
            if cell.size != (cell_w, cell_h):
                cell = cell.resize((cell_w, cell_h), Image.LANCZOS)
            grid.paste(cell, (row_label_w + column * column_w + (column_w - cell_w) // 2, y))
    return grid


def _wrap(draw: ImageDraw.ImageDraw, text: str, typeface, max_width: int, max_lines: int = 4) -> list[str]:
    """Wrap to the column's pixel width; a prompt longer than `max_lines` ends in an ellipsis."""
    lines: list[str] = []
    for chars in range(60, 4, -4):
        lines = textwrap.wrap(text, chars) or [""]
        if all(text_width(draw, line, typeface) <= max_width for line in lines):
            break
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1].rstrip(",. ") + " ..."]
    return lines


def backend_renderer(backend: Backend, name: str, num_vectors: int) -> Render:
    """Render with the standalone backend's sampler, the run's name recognised in prompts."""
    backend.prompt_encoder.chunker.register(name, num_vectors)
    return backend.render


def renderer_for(services, run: RunInfo) -> Render:
    """The host's txt2img when it has one (inside the WebUI), else the backend's own sampler."""
    if services.render_preview is not None:
        host_render = services.render_preview
        return host_render
    saved = run.saved_steps()
    if not saved:
        raise UserError(f"{run.root} has no saved steps to compare.")
    num_vectors = load_embedding(next(iter(saved.values()))).num_vectors
    return backend_renderer(services.get_backend(), run.name, num_vectors)
