"""`TrainConfig`: the single description of a run. The UI, CLI, API and the saved settings JSON all use it."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ti_trainer.errors import UserError

LATENT_SAMPLING = ("once", "deterministic", "random")
CLIP_MODES = ("disabled", "value", "norm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Memory levers (ti_trainer/memory.py); "auto" chooses from the device and the model.
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "math")
CHECKPOINTING_CHOICES = ("auto", "off", "high-res", "all")
UPCAST_CHOICES = ("auto", "on", "off")
# Image sizes in pixels, as preprocessing allows them: 4096 px is far past what SD 1.x/2.x were trained on,
# and a bigger size only ends in a MemoryError while the images are resized.
MIN_SIZE_PX = 64
MAX_SIZE_PX = 4096
# Text fields that also take a plain number: a schedule of one learning rate written as 0.005, not "0.005".
NUMBER_AS_TEXT_FIELDS = ("learn_rate", "clip_grad_value")
SAVE_FORMATS = ("pt", "safetensors")


@dataclass
class TrainConfig:
    # What to train, on what
    embedding_name: str = ""
    data_dir: str = ""
    embeddings_dir: str = "embeddings"
    log_dir: str = "textual_inversion"
    template: str = "style_filewords.txt"
    templates_dirs: list[str] = field(default_factory=list)
    # Optimisation (A1111's Train tab and defaults, reference/a1111.md §1.11)
    learn_rate: str = "0.005"
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_steps: int = 3000
    clip_grad_mode: str = "disabled"
    clip_grad_value: str = "0.1"
    weight_decay: float = 0.0
    # Data
    width: int = 512
    height: int = 512
    keep_size: bool = False  # A1111's "Do not resize images": every distinct size is its own bucket
    aspect_buckets: bool = False  # resize each image to the bucket nearest its aspect ratio (A1111 #6507)
    latent_sampling: str = "once"
    shuffle_tags: bool = False
    tag_dropout: float = 0.0
    use_alpha_weight: bool = False
    filename_regex: str = ""
    filename_join: str = " "
    # Saving
    save_every: int = 50
    preview_every: int = 50
    write_csv_every: int = 1
    save_image_with_embedding: bool = True
    save_optimizer_state: bool = True
    # The file format of <name> and its step copies: "pt" (A1111's own, read everywhere) or "safetensors"
    # (tensors only; read by A1111, Forge, diffusers and ComfyUI). PNG copies are written beside either.
    save_format: str = "pt"
    # Previews: an empty prompt means "the first caption of the current batch", as in A1111
    preview_prompt: str = ""
    preview_negative_prompt: str = ""
    preview_steps: int = 20
    preview_sampler: str = "Euler a"
    preview_cfg_scale: float = 7.0
    # A fixed preview seed (not A1111's -1) so previews of different steps differ only by the embedding.
    preview_seed: int = 1
    preview_width: int = 0  # 0 = training width
    preview_height: int = 0
    # Reproducibility and numerics
    seed: int | None = None  # None: chosen at start and recorded in the settings and the .optim file
    precision: str = "auto"
    # Memory levers (ti_trainer/memory.py). The plan in force is reported in words when a run starts.
    attention: str = "auto"  # SDPA, or xformers when installed; "math" is the plain path A1111 trains with
    gradient_checkpointing: str = "auto"  # auto: off, raised on a GPU only if the batch needs it (fit.py)
    vae_offload: bool = True  # the VAE waits in RAM while training (latents are cached first)
    upcast_attention: str = "auto"  # auto: fp32 attention scores when the model wants them, under fp16
    # Choosing the result (ti_trainer/analysis): a loss on a fixed batch, comparable across steps (DVAR,
    # reference/peers.md §4), and the DVAR stopping rule on it. The window is in steps; the threshold is
    # Var(loss over the window) / Var(loss over the whole run). 200 steps / 0.15 are the DVAR repository's
    # defaults. Stopping is on: the rule waits for the loss to level off, the saved copies stay, and a stopped
    # run resumes from its last save (see analysis/early_stopping.py for why this default).
    validate_every: int = 10  # 0 = no validation loss, no early stopping
    early_stopping: bool = True
    early_stop_window: int = 200
    early_stop_threshold: float = 0.15

    def validate(self) -> None:
        """Check everything that can be checked without the model or the images."""
        problems = []
        if self.batch_size < 1:
            problems.append(f"Batch size must be at least 1 (got {self.batch_size}).")
        if self.gradient_accumulation < 1:
            problems.append(
                f"Gradient accumulation steps must be at least 1 (got {self.gradient_accumulation})."
            )
        if self.max_steps < 1:
            problems.append(f"Max steps must be at least 1 (got {self.max_steps}).")
        for name in ("save_every", "preview_every", "write_csv_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 (off) or a positive number of steps.")
        for name in ("width", "height"):
            problem = size_problem(f"Training {name}", getattr(self, name))
            if problem:
                problems.append(problem)
        for name in ("preview_width", "preview_height"):
            value = getattr(self, name)
            problem = size_problem(f"Preview {name.split('_')[1]}", value, zero_means="the training size")
            if problem:
                problems.append(problem)
        if self.latent_sampling not in LATENT_SAMPLING:
            problems.append(f"Latent sampling must be one of {', '.join(LATENT_SAMPLING)}.")
        if self.clip_grad_mode not in CLIP_MODES:
            problems.append(f"Gradient clipping must be one of {', '.join(CLIP_MODES)}.")
        if not 0.0 <= self.tag_dropout <= 1.0:
            problems.append(f"Tag dropout is a probability between 0 and 1 (got {self.tag_dropout}).")
        if self.save_format not in SAVE_FORMATS:
            problems.append(
                f"Save format must be one of {', '.join(SAVE_FORMATS)} (got {self.save_format!r})."
            )
        if self.precision not in PRECISIONS:
            problems.append(f"Precision must be one of {', '.join(PRECISIONS)}.")
        for name, choices in (
            ("attention", ATTENTION_CHOICES),
            ("gradient_checkpointing", CHECKPOINTING_CHOICES),
            ("upcast_attention", UPCAST_CHOICES),
        ):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r}).")
        if self.validate_every < 0:
            problems.append(
                f"'Validate every N steps' must be 0 (off) or a positive number (got {self.validate_every})."
            )
        if self.early_stop_window < 1:
            problems.append(
                f"The early-stopping window must be at least 1 step (got {self.early_stop_window})."
            )
        if not 0.0 < self.early_stop_threshold < 1.0:
            problems.append(
                f"The early-stopping threshold is a variance ratio between 0 and 1 (got {self.early_stop_threshold})."
            )
        if self.keep_size and self.aspect_buckets:
            problems.append("Choose either 'keep size' or 'aspect-ratio buckets', not both.")
        if problems:
            raise UserError("\n".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the training settings") -> TrainConfig:
        """A config from JSON-like values (a settings file, an API request, the form); unknown keys are
        ignored. Every value is checked against its field's type first: UserError names each field that is
        wrong, what it holds and what it should hold (`source` says where the values came from)."""
        if not isinstance(data, dict):
            raise UserError(
                f"{source} must be a JSON object of setting names and values, e.g. "
                f'{{"embedding_name": "my-style", "learn_rate": "0.005"}}; it is a {_json_kind(data)}.'
            )
        hints = typing.get_type_hints(cls)
        values, problems = {}, []
        for spec in dataclasses.fields(cls):
            if spec.name not in data:
                continue
            try:
                values[spec.name] = _checked_value(spec.name, hints[spec.name], data[spec.name])
            except ValueError as problem:
                problems.append(str(problem))
        if problems:
            raise UserError(f"Wrong setting type(s) in {source}:\n" + "\n".join(problems))
        return cls(**values)

    @classmethod
    def from_settings_file(cls, path: Path) -> TrainConfig:
        """Read a run's settings JSON (ours, written beside its log) back into a config."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"Could not read the settings file {path}: {error}") from error
        if isinstance(data, dict):
            data = data.get("ti_trainer_config", data)
        return cls.from_dict(data, f"the settings file {path}")


def size_problem(label: str, value: int, zero_means: str = "") -> str | None:
    """What is wrong with an image size in pixels (None if nothing): a multiple of 8 within the bounds, or 0
    where `zero_means` says what 0 stands for."""
    if zero_means and value == 0:
        return None
    if MIN_SIZE_PX <= value <= MAX_SIZE_PX and value % 8 == 0:
        return None
    zero = f", or 0 for {zero_means}" if zero_means else ""
    return f"{label} must be a multiple of 8 between {MIN_SIZE_PX} and {MAX_SIZE_PX} px{zero} (got {value})."


def _json_kind(value: Any) -> str:
    """A value's type as JSON calls it, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _expected(kind: Any) -> str:
    """A field's annotation in words: "a whole number", "true or false", "a list of text" ..."""
    if kind is bool:
        return "true or false"
    if kind is int:
        return "a whole number"
    if kind is float:
        return "a number"
    if kind is str:
        return "text"
    if typing.get_origin(kind) is list:
        return "a list of text"
    arguments = typing.get_args(kind)
    if type(None) in arguments:
        inner = [argument for argument in arguments if argument is not type(None)]
        return " or ".join([*(_expected(argument) for argument in inner), "null"])
    return str(kind)


def _checked_value(name: str, kind: Any, value: Any) -> Any:
    """`value` as field `name` (annotated `kind`) holds it, or ValueError naming the field and the type.

    JSON has one number type, so a whole number written as 2.0 is accepted for an int; true/false are
    accepted only for bool fields (Python would take True as 1).
    """
    problem = ValueError(f"- {name}: expected {_expected(kind)}, got {_json_kind(value)} {value!r}")
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        if value is None and type(None) in typing.get_args(kind):
            return None
        inner = [argument for argument in typing.get_args(kind) if argument is not type(None)]
        for argument in inner:
            try:
                return _checked_value(name, argument, value)
            except ValueError:
                continue
        raise problem
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise problem
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        if is_number and float(value).is_integer():
            return int(value)
        raise problem
    if kind is float:
        if is_number and math.isfinite(value):
            return float(value)
        raise problem
    if kind is str:
        if isinstance(value, str):
            return value
        if name in NUMBER_AS_TEXT_FIELDS and is_number and math.isfinite(value):
            return repr(value) if isinstance(value, float) else str(value)
        raise problem
    if typing.get_origin(kind) is list:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise problem
    return value
