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
# Memory levers (ti_trainer/memory/plan.py); "auto" chooses from the device and the model.
ATTENTION_CHOICES = ("auto", "sdpa", "xformers", "math")
CHECKPOINTING_CHOICES = ("auto", "off", "high-res", "all")
UPCAST_CHOICES = ("auto", "on", "off")
LENDING_CHOICES = ("auto", "on", "off")
# Image sizes in pixels, as preprocessing allows them: 4096 px is far past what SD 1.x/2.x were trained on,
# and a bigger size only ends in a MemoryError while the images are resized.
MIN_SIZE_PX = 64
MAX_SIZE_PX = 4096
# Text fields that also take a plain number: a schedule of one learning rate written as 0.005, not "0.005".
NUMBER_AS_TEXT_FIELDS = ("learn_rate", "clip_grad_value")
SAVE_FORMATS = ("pt", "safetensors")


@dataclass(frozen=True)
class FieldInfo:
    """How a TrainConfig field is presented: the panel, the WebUI's settings page and the CLI read this."""

    label: str
    help: str = ""
    flag: str = ""  # the CLI's: "--flag", or a bare word for a positional argument; "": from the name
    choices: tuple[str, ...] = ()


def setting(default=dataclasses.MISSING, *, label: str, help: str = "", flag: str = "", choices=(), **kwargs):
    """A TrainConfig field with its presentation (`field_info(name)` reads it back)."""
    return field(default=default, metadata={"info": FieldInfo(label, help, flag, tuple(choices))}, **kwargs)


@dataclass
class TrainConfig:
    # What to train, on what
    embedding_name: str = setting(
        "", label="Embedding", help="the embedding to train (<name>.pt)", flag="name"
    )
    data_dir: str = setting(
        "",
        label="Dataset directory",
        help="folder of training images (captions in <image>.txt)",
        flag="--data",
    )
    embeddings_dir: str = setting(
        "embeddings", label="Embeddings directory", help="where <name>.pt (or .safetensors) lives"
    )
    log_dir: str = setting(
        "textual_inversion",
        label="Log directory",
        help="where copies, previews and logs go (a relative path starts at the working folder; in the WebUI, at its folder)",
    )
    template: str = setting(
        "style_filewords.txt", label="Prompt template", help="prompt template file name or path"
    )
    templates_dirs: list[str] = setting(
        label="Template folders",
        help="a folder to look for templates in (repeatable)",
        flag="--templates-dir",
        default_factory=list,
    )
    # Optimisation (A1111's Train tab and defaults, reference/a1111.md §1.11)
    learn_rate: str = setting(
        "0.005",
        label="Embedding learning rate",
        help="learning rate or schedule, e.g. '0.005:100, 1e-3:1000, 1e-5'",
        flag="--lr",
    )
    batch_size: int = setting(1, label="Batch size", help="images per micro-batch", flag="--batch")
    gradient_accumulation: int = setting(
        1,
        label="Gradient accumulation steps",
        help="micro-batches averaged into one optimizer step",
        flag="--grad-accum",
    )
    max_steps: int = setting(3000, label="Max steps", help="the step training stops at", flag="--steps")
    clip_grad_mode: str = setting(
        "disabled",
        label="Gradient clipping",
        help="clip gradients by value or by norm",
        flag="--clip-mode",
        choices=CLIP_MODES,
    )
    clip_grad_value: str = setting(
        "0.1", label="Clip value", help="gradient clipping value or schedule", flag="--clip-value"
    )
    weight_decay: float = setting(
        0.0, label="Weight decay", help="AdamW weight decay (0: off, as in the WebUI)"
    )
    # Data
    width: int = setting(512, label="Width", help="training width in pixels (a multiple of 8)")
    height: int = setting(512, label="Height", help="training height in pixels (a multiple of 8)")
    # A1111's "Do not resize images": every distinct size is its own bucket
    keep_size: bool = setting(
        False, label="Do not resize images", help="train every image at its own size (one bucket per size)"
    )
    # Resize each image to the bucket nearest its aspect ratio (A1111 #6507)
    aspect_buckets: bool = setting(
        False,
        label="Aspect-ratio buckets",
        help="fit each image to the bucket nearest its aspect ratio instead of one shape",
        flag="--buckets",
    )
    latent_sampling: str = setting(
        "once",
        label="Choose latent sampling method",
        help="once: one sample per image, reused; deterministic: the mean; random: a new sample each time",
        choices=LATENT_SAMPLING,
    )
    shuffle_tags: bool = setting(
        False,
        label="Shuffle tags by ',' when creating prompts",
        help="shuffle each caption's comma-separated tags",
    )
    tag_dropout: float = setting(
        0.0, label="Drop out tags when creating prompts", help="probability of dropping each caption tag"
    )
    use_alpha_weight: bool = setting(
        False,
        label="Use PNG alpha channel as loss weight",
        help="transparent parts of PNGs count less in the loss",
        flag="--alpha-weight",
    )
    filename_regex: str = setting(
        "",
        label="Filename word regex",
        help="for images without a caption: the words of the file name to keep",
    )
    filename_join: str = setting(" ", label="Filename join string", help="what goes between those words")
    # Saving
    save_every: int = setting(
        50,
        label="Save a copy of embedding to log directory every N steps, 0 to disable",
        help="save a copy every N steps (0: off)",
    )
    # A preview costs about 15 training steps at batch 1 (20 sampler steps, each a UNet pass over the prompt
    # and the negative prompt, and a VAE decode): every 500 steps (A1111's default) keeps it near 3%. The
    # comparison grid renders every saved copy side by side after the run (docs/monitors.md).
    preview_every: int = setting(
        500,
        label="Save an image to log directory every N steps, 0 to disable",
        help="render a preview every N steps (0: off)",
    )
    write_csv_every: int = setting(
        1,
        label="Write the loss to a CSV every N steps, 0 to disable",
        help="write the loss to textual_inversion_loss.csv every N steps (0: off)",
    )
    save_image_with_embedding: bool = setting(
        True,
        label="Save images with embedding in PNG chunks",
        help="also save each preview as a PNG that carries the embedding",
    )
    save_optimizer_state: bool = setting(
        True,
        label="Save optimizer state (.optim) for exact resume",
        help="save the optimizer state beside the embedding, so a resumed run continues exactly",
    )
    # The file format of <name> and its step copies: "pt" (A1111's own, read everywhere) or "safetensors"
    # (tensors only; read by A1111, Forge, diffusers and ComfyUI). PNG copies are written beside either.
    save_format: str = setting(
        "pt",
        label="Embedding file format (pt: A1111's own; safetensors: tensors only, loads in A1111, "
        "Forge, diffusers, ComfyUI)",
        help="file format of the embedding and its step copies: pt (A1111's, default) or safetensors",
        choices=SAVE_FORMATS,
    )
    # Previews: an empty prompt means "the first caption of the current batch", as in A1111
    preview_prompt: str = setting("", label="Preview prompt", help="empty: the first caption of the batch")
    preview_negative_prompt: str = setting(
        "", label="Preview negative prompt", help="what previews should avoid", flag="--preview-negative"
    )
    preview_steps: int = setting(20, label="Preview sampling steps", help="sampling steps per preview")
    preview_sampler: str = setting(
        "Euler a", label="Preview sampling method", help="the sampler previews are drawn with"
    )
    preview_cfg_scale: float = setting(7.0, label="Preview CFG scale", help="CFG scale of previews")
    # A fixed preview seed (not A1111's -1) so previews of different steps differ only by the embedding.
    preview_seed: int = setting(
        1, label="Preview seed", help="seed of previews (fixed: steps stay comparable)"
    )
    preview_width: int = setting(0, label="Preview width (0: training width)", help="0: the training width")
    preview_height: int = setting(
        0, label="Preview height (0: training height)", help="0: the training height"
    )
    # Reproducibility and numerics
    # None: chosen at start and recorded in the settings and the .optim file
    seed: int | None = setting(
        None,
        label="Training seed (-1: random)",
        help="seed for a reproducible run (default: chosen at start)",
    )
    precision: str = setting(
        "auto",
        label="Precision",
        help="auto: bf16 where the GPU has it, else fp16; fp32 on a CPU",
        choices=PRECISIONS,
    )
    # Memory levers (ti_trainer/memory/plan.py). The plan in force is reported in words when a run starts.
    # SDPA, or xformers when installed; "math" is the plain path A1111 trains with
    attention: str = setting(
        "auto",
        label="Attention",
        help="auto: SDPA, or xformers when installed; math: the plain kind the WebUI trains with",
        choices=ATTENTION_CHOICES,
    )
    # auto: off, raised on a GPU only if the batch needs it (fit.py)
    gradient_checkpointing: str = setting(
        "auto",
        label="Gradient checkpointing",
        help="recompute activations to save memory; auto: only if the batch would not fit",
        choices=CHECKPOINTING_CHOICES,
    )
    # The VAE waits in RAM while training (latents are cached first)
    vae_offload: bool = setting(
        True, label="Keep the VAE in RAM while training", help="move the VAE off the GPU while training"
    )
    # SDXL: its two text encoders (~1.6 GB of fp16 weights) wait in RAM and come to the GPU only for their own
    # forward and backward. auto: off, raised on a GPU only if the batch needs it, before more checkpointing
    # (fit.py). SD 1.x/2.x and Forge do not lend (memory/plan.py `lending_asked` says why).
    lend_text_encoders: str = setting(
        "auto",
        label="SDXL text encoders on the GPU only for their own work",
        help="SDXL: keep both text encoders in RAM and bring each to the GPU only for its forward and backward "
        "(saves ~1.5 GB, costs a copy of their weights each step); auto: only if the batch needs it",
        choices=LENDING_CHOICES,
    )
    # auto: fp32 attention scores when the model wants them, under fp16
    upcast_attention: str = setting(
        "auto",
        label="Attention scores in fp32",
        help="auto: when the model wants them, under fp16 (SD 2.1 768-v)",
        choices=UPCAST_CHOICES,
    )
    # Choosing the result (ti_trainer/analysis): a loss on a fixed batch, comparable across steps (DVAR,
    # reference/peers.md §4), and the DVAR stopping rule on it. The window is in steps; the threshold is
    # Var(loss over the window) / Var(loss over the whole run). 200 steps / 0.15 are the DVAR repository's
    # defaults. Stopping is on: the rule waits for the loss to level off, the saved copies stay, and a stopped
    # run resumes from its last save (see analysis/early_stopping.py for why this default). Every 50 steps, as
    # save_every: each point of the curve is a step with a copy, and it costs ~2% (analysis/monitors.py).
    validate_every: int = setting(
        50,
        label="Validation loss every N steps, 0 to disable",
        help="fixed-batch validation loss every N steps (0: no validation loss, no early stopping)",
    )
    early_stopping: bool = setting(
        True,
        label="Stop early when the validation loss levels off",
        help="stop when the validation loss levels off (off: train to max steps; a step is still suggested)",
    )
    early_stop_window: int = setting(200, label="Early-stopping window (steps)", help="DVAR window in steps")
    early_stop_threshold: float = setting(
        0.15, label="Early-stopping threshold (variance ratio)", help="DVAR variance-ratio threshold"
    )

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
            ("lend_text_encoders", LENDING_CHOICES),
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


def field_info(name: str) -> FieldInfo:
    """The label, help, CLI flag and choices of TrainConfig field `name`."""
    return TrainConfig.__dataclass_fields__[name].metadata["info"]


def cli_flag(name: str) -> str:
    """The CLI's flag for field `name`: its own, or `--` and the name in kebab case."""
    return field_info(name).flag or "--" + name.replace("_", "-")


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
