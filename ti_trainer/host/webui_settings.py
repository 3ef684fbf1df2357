"""Our defaults on a WebUI's Settings page (category "Training"), for A1111 and Forge alike.

Both WebUIs keep A1111's settings machinery (`shared.opts.add_option`, `shared.OptionInfo`, sections and
categories), so one description serves both; each host hands in its WebUI's `shared` module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

from ti_trainer.config import LATENT_SAMPLING, PRECISIONS, TrainConfig

SETTINGS_SECTION = ("ti_trainer", "TI Trainer")
OPTION_PREFIX = "ti_trainer_"

# TrainConfig field -> label on the Settings page.
SETTINGS = {
    "learn_rate": "Learning rate (a number, or a schedule such as 0.005:100, 1e-3:1000, 1e-5)",
    "batch_size": "Batch size: images in one step",
    "gradient_accumulation": "Gradient accumulation: batches averaged into one step",
    "max_steps": "Max steps",
    "width": "Training width",
    "height": "Training height",
    "template": "Prompt template file",
    "latent_sampling": "Latent sampling method",
    "save_every": "Save a copy of the embedding every N steps (0: only at the end)",
    "preview_every": "Render a preview every N steps (0: never)",
    "write_csv_every": "Write the loss to the CSV log every N steps (0: never)",
    "save_optimizer_state": "Save the optimizer state beside the embedding (.optim), so a resumed run continues exactly",
    "save_image_with_embedding": "Save previews with the embedding inside the PNG",
    "precision": "Precision (auto: bf16 where the GPU has it, else fp16)",
    "log_dir": "Log folder for copies, previews and losses (relative to the WebUI folder)",
}
CHOICES = {"latent_sampling": LATENT_SAMPLING, "precision": PRECISIONS}
_DEFAULTS = TrainConfig()


def add_settings(shared: ModuleType) -> None:
    """Put our defaults on the WebUI's Settings page."""
    import gradio as gr

    for field, label in SETTINGS.items():
        default = getattr(_DEFAULTS, field)
        component, component_args = None, None
        if field in CHOICES:
            component, component_args = gr.Radio, {"choices": list(CHOICES[field])}
        elif isinstance(default, bool):
            component = gr.Checkbox
        elif isinstance(default, int):
            component, component_args = gr.Number, {"precision": 0}
        info = shared.OptionInfo(
            default,
            label,
            component,
            component_args,
            section=SETTINGS_SECTION,
            category_id="training",
        )
        shared.opts.add_option(OPTION_PREFIX + field, info)


def setting(shared: ModuleType, field: str):
    """Our default for a TrainConfig field from the Settings page, in the field's type."""
    default = getattr(_DEFAULTS, field)
    value = getattr(shared.opts, OPTION_PREFIX + field, default)
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(float(value))  # the WebUI stores numbers from its Number fields as floats
    return type(default)(value)


class SettingsDefaults(Mapping):
    """Our Settings-page defaults, read when asked, so "Apply settings" takes effect without a restart."""

    def __init__(self, shared: ModuleType):
        self.shared = shared

    def __getitem__(self, field: str):
        if field not in SETTINGS:
            raise KeyError(field)
        if field == "log_dir":
            return str(Path(self.shared.data_path, setting(self.shared, field)))
        return setting(self.shared, field)

    def __iter__(self) -> Iterator[str]:
        return iter(SETTINGS)

    def __len__(self) -> int:
        return len(SETTINGS)
