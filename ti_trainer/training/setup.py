"""Everything checked and loaded before the first step: bad input is reported before GPU time is spent."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ti_trainer.backends.contract import family_title_for_width
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import existing_embedding_file
from ti_trainer.embeddings.embedding import Embedding
from ti_trainer.embeddings.files import load_embedding, load_optimizer_state
from ti_trainer.errors import UserError
from ti_trainer.fsutil import validate_embedding_name
from ti_trainer.images import LoadedFolder, load_folder
from ti_trainer.memory.plan import MemoryPlan, plan_for
from ti_trainer.text.prompts import PromptBuilder
from ti_trainer.text.templates import BUILTIN_TEMPLATES_DIR, Template, list_templates, read_template
from ti_trainer.training.schedule import Schedule, parse_schedule

if TYPE_CHECKING:
    from ti_trainer.backends.contract import Backend


@dataclass
class PreparedRun:
    config: TrainConfig
    embedding: Embedding
    embedding_path: Path
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
    if embedding.width != backend.text_width:
        raise UserError(
            f"{embedding_path.name} has vectors of width {embedding.width} "
            f"({family_title_for_width(embedding.width, 'another model')}), but the loaded model's text "
            f"encoder has width {backend.text_width} ({backend.family.title}). Create the embedding with "
            "the model you train on."
        )
    # A1111 always trains into <name>.pt, whatever the source format.
    embedding_path = embedding_path.with_suffix(".pt")

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

    optimizer_state = None
    if initial_step > 0:
        optimizer_state = load_optimizer_state(embedding, embedding_path)
        if optimizer_state is None:
            messages.append(
                f"Resuming {name!r} from step {initial_step} without optimizer state "
                f"(no matching {embedding_path.name}.optim): the first steps may wander."
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
