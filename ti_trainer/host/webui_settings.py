"""Our defaults on a WebUI's Settings page (category "Training"), for A1111 and Forge alike.

Both WebUIs keep A1111's settings machinery (`shared.opts.add_option`, `shared.OptionInfo`, sections and
categories), so one description serves both; each host hands in its WebUI's `shared` module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType

from ti_trainer.config import TrainConfig, field_info

SETTINGS_SECTION = ("ti_trainer", "TI Trainer")
OPTION_PREFIX = "ti_trainer_"

# Our defaults on the Settings page, shown with the fields' labels and help (config.py's field metadata).
SETTINGS = (
    "learn_rate",
    "batch_size",
    "gradient_accumulation",
    "max_steps",
    "width",
    "height",
    "template",
    "latent_sampling",
    "save_every",
    "preview_every",
    "write_csv_every",
    "save_optimizer_state",
    "save_image_with_embedding",
    "precision",
    "log_dir",
)
_DEFAULTS = TrainConfig()


def add_settings(shared: ModuleType) -> None:
    """Put our defaults on the WebUI's Settings page."""
    import gradio as gr

    for field in SETTINGS:
        default, info = getattr(_DEFAULTS, field), field_info(field)
        component, component_args = None, None
        if info.choices:
            component, component_args = gr.Radio, {"choices": list(info.choices)}
        elif isinstance(default, bool):
            component = gr.Checkbox
        elif isinstance(default, int):
            component, component_args = gr.Number, {"precision": 0}
        option = shared.OptionInfo(
            default,
            info.label,
            component,
            component_args,
            section=SETTINGS_SECTION,
            category_id="training",
        )
        shared.opts.add_option(OPTION_PREFIX + field, option.info(info.help) if info.help else option)


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
