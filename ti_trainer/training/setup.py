"""Everything checked and loaded before the first step: bad input is reported before GPU time is spent."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.checks import require_fits
from ti_trainer.embeddings.create import existing_embedding_file
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import load_embedding, load_optimizer_state
from ti_trainer.errors import UserError
from ti_trainer.fsutil import validate_embedding_name
from ti_trainer.images import LoadedFolder, load_folder
from ti_trainer.memory.plan import MemoryPlan, plan_for
from ti_trainer.prepare.lint import TokenBudget, over_budget, token_counter
from ti_trainer.text.prompts import PromptBuilder
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR, Template, list_templates, read_template
from ti_trainer.training.schedule import Schedule, parse_schedule

# Textual inversion trains at about 5e-4 to 5e-2; a rate above this is a typo, not a choice.
MAX_SANE_LEARN_RATE = 1.0
MAX_LISTED = 10  # files named in one warning; the rest are counted

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend


@dataclass
class PreparedRun:
    config: TrainConfig
    embedding: Embedding
    embedding_path: Path  # where training writes <name>, in the save format
    source_path: Path  # the file the run started from (the same file unless the format changes)
    optimizer_state: dict | None
    learn_rate: Schedule
    clip_value: Schedule | None
    template: Template
    prompts: PromptBuilder
    folder: LoadedFolder
    seed: int
    initial_step: int
    end_step: int
    messages: list[str]
    # The run's memory plan, worked out once here and passed on (fit.py may raise its checkpointing).
    memory_plan: MemoryPlan


def find_template(config: TrainConfig) -> Path:
    folders = [*config.templates_dirs, BUILTIN_TEMPLATES_DIR]
    direct = Path(config.template)
    if direct.is_file():
        return direct
    templates = list_templates(*folders)
    if config.template not in templates:
        known = ", ".join(sorted(templates)) or "none"
        raise UserError(f"Prompt template {config.template!r} not found. Available: {known}.")
    return templates[config.template]


def learn_rate_warnings(learn_rate: Schedule) -> list[str]:
    """A rate above MAX_SANE_LEARN_RATE anywhere in the schedule (a typo such as 1e9 for 1e-9, or 5 for 0.005)
    makes the vectors grow to huge lengths, useless in any prompt; the run is not refused, it is explained."""
    too_high = sorted({value for value, _ in learn_rate.pieces if value > MAX_SANE_LEARN_RATE}, reverse=True)
    if not too_high:
        return []
    rates = ", ".join(f"{value:g}" for value in too_high)
    return [
        f"Learning rate {rates} (in {learn_rate.text!r}) is far above what textual inversion uses "
        f"(about 0.0005 to 0.05; A1111's default is 0.005): the vectors will grow to enormous lengths and the "
        "embedding will swamp every prompt. Check for a typo (1e9 for 1e-9?) and press Interrupt if it is one."
    ]


def long_caption_warnings(
    folder: LoadedFolder, template: Template, name: str, vectors: int, chunker
) -> list[str]:
    """Captions whose training prompts run past one prompt chunk (the caption lint's token budget, with the
    embedding's vectors counted): every further chunk is another text-encoder pass and longer cross-attention,
    so a pasted essay makes every step that draws it many times slower."""
    budget = TokenBudget(template.lines, name, token_counter(chunker, name, vectors))
    captions = [(_caption_source(image.path), image.caption) for image in folder.images]
    found = over_budget(captions, budget)
    if not found:
        return []
    listed = "; ".join(
        f"{source}: {tokens} tokens ({math.ceil(tokens / budget.limit)} chunks)"
        for source, tokens in found[:MAX_LISTED]
    )
    more = f"; and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
    return [
        f"{len(found)} caption(s) make training prompts longer than one {budget.limit}-token chunk (the "
        f"embedding's {vectors} vector(s) counted): {listed}{more}. Each extra chunk is another pass of the text "
        "encoder, so steps that draw them are slower, and the caption's words spread the embedding's share of "
        "the prompt thin. Shorten them (python -m ti_trainer report lists them)."
    ]


def _caption_source(image_path: Path) -> str:
    caption_file = image_path.with_suffix(".txt")
    return caption_file.name if caption_file.is_file() else f"{image_path.name} (caption from its file name)"


def sdxl_save_format_note(asked: str) -> str:
    return (
        f"Saving as .safetensors, not .{asked}: an SDXL embedding's .pt can hold only its two tensors (A1111 "
        "takes every value of an SDXL file for a tensor), so it could not record the step a later run resumes "
        "from; a .safetensors keeps the step in its header and loads in A1111, ComfyUI, kohya and diffusers."
    )


def prepare_run(config: TrainConfig, backend: Backend) -> PreparedRun:
    config.validate()
    memory_plan = plan_for(config, backend)  # an impossible choice (xformers not installed) is reported now
    messages: list[str] = []
    name = validate_embedding_name(config.embedding_name)
    config.embedding_name = name

    embedding_path = existing_embedding_file(Path(config.embeddings_dir), name)
    if embedding_path is None:
        raise UserError(
            f"No embedding named {name!r} in {config.embeddings_dir}. Create it first "
            f"(python -m ti_trainer create {name!r} --init-text '...'), or check the embeddings folder."
        )
    embedding = load_embedding(embedding_path)
    embedding.name = name
    require_fits(embedding_path, embedding.vectors, backend.family)
    if backend.family.vectors_per_encoder and config.save_format != "safetensors":
        messages.append(sdxl_save_format_note(config.save_format))
        config.save_format = "safetensors"
    # Training writes <name> in the chosen format (A1111 always writes .pt); a source in the other format is
    # replaced at the first save, so one name never stands for two files (outputs.save_current).
    source_path = embedding_path
    embedding_path = embedding_path.with_suffix(f".{config.save_format}")
    if source_path != embedding_path:
        messages.append(
            f"Training {name!r} into {embedding_path.name} (save format {config.save_format}); {source_path.name} "
            "is replaced by it at the first save."
        )

    learn_rate = parse_schedule(config.learn_rate, config.max_steps, "learning rate")
    clip_value = None
    if config.clip_grad_mode != "disabled":
        clip_value = parse_schedule(config.clip_grad_value, config.max_steps, "gradient clipping value")

    initial_step = embedding.step
    end_step = min(config.max_steps, learn_rate.end_step)
    if end_step < config.max_steps:
        messages.append(f"The learning-rate schedule ends at step {end_step}; training will stop there.")
    if initial_step >= end_step:
        raise UserError(
            f"{name!r} has already been trained for {initial_step} steps, which reaches the max steps "
            f"({end_step}). Raise max steps to train further."
        )

    template = read_template(find_template(config))
    messages += template.warnings
    folder = load_folder(
        config.data_dir, config.use_alpha_weight, config.filename_regex, config.filename_join
    )
    for problem in folder.skipped:
        messages.append(f"Skipped {problem.path}: {problem.reason}")
    prompts = PromptBuilder(template, name, config.shuffle_tags, config.tag_dropout)

    # The name must be recognised in every prompt, or that prompt teaches nothing.
    encoder = backend.prompt_encoder
    encoder.chunker.register(name, embedding.num_vectors)
    sample_caption = folder.images[0].caption
    for line in template.lines:
        if "[name]" not in line:
            continue
        prompt = line.replace("[filewords]", sample_caption).replace("[name]", name)
        if encoder.count_injections(prompt, name) == 0:
            raise UserError(
                f"The embedding name {name!r} is not recognised in the prompt {prompt!r} built from "
                f"{template.path.name}: after tokenization it runs into the surrounding text. "
                "Put spaces or commas around [name] in the template."
            )

    messages += long_caption_warnings(folder, template, name, embedding.num_vectors, encoder.chunker)
    messages += learn_rate_warnings(learn_rate)

    optimizer_state = None
    if initial_step > 0:
        optimizer_state = load_optimizer_state(embedding, source_path)
        if optimizer_state is None:
            messages.append(
                f"Resuming {name!r} from step {initial_step} without optimizer state "
                f"(no matching {source_path.name}.optim): the first steps may wander."
            )
    resumed = (optimizer_state or {}).get("ti_trainer", {})
    seed = config.seed if config.seed is not None else resumed.get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    config.seed = int(seed)

    return PreparedRun(
        config,
        embedding,
        embedding_path,
        source_path,
        optimizer_state,
        learn_rate,
        clip_value,
        template,
        prompts,
        folder,
        int(seed),
        initial_step,
        end_step,
        messages,
        memory_plan,
    )
