"""The Train form is a `TrainConfig`: one component per field, read into a config and written back from one.

The host fills the fields the artist does not choose here (where embeddings and templates live); everything
else is on the form, so a run started from the panel is described by its settings JSON exactly like a CLI run.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING

from ti_trainer.config import TrainConfig, field_info
from ti_trainer.errors import UserError

if TYPE_CHECKING:
    from ti_trainer.host.base import HostServices

HOST_FIELDS = ("embeddings_dir", "templates_dirs")  # set from the host, not shown on the form
RANDOM_SEED = -1  # the form's "pick one for me", as in A1111's seed fields
PATH_FIELDS = ("data_dir", "log_dir")  # pasted paths often carry stray spaces; other text is kept as typed


def form_fields() -> list[str]:
    """Every TrainConfig field the form must show."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in HOST_FIELDS]


def initial_config(services: HostServices) -> TrainConfig:
    """TrainConfig's defaults, then the host's settings page, then the host's folders."""
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **services.defaults})
    config.log_dir = str(services.defaults.get("log_dir", services.log_dir))
    return with_host_folders(config, services)


def with_host_folders(config: TrainConfig, services: HostServices) -> TrainConfig:
    config.embeddings_dir = str(services.embeddings_dir)
    config.templates_dirs = [str(folder) for folder in services.templates_dirs]
    return config


def form_values(config: TrainConfig, names: list[str]) -> list:
    """The config as the form's component values, in `names` order."""
    values = []
    for name in names:
        value = getattr(config, name)
        if name == "seed" and value is None:
            value = RANDOM_SEED
        values.append(value)
    return values


def config_from_form(services: HostServices, names: list[str], values: list) -> TrainConfig:
    """Read the form back into a config; UserError names the field whose value cannot be read."""
    types = typing.get_type_hints(TrainConfig)
    data = {}
    for name, value in zip(names, values, strict=True):
        data[name] = _coerce(name, types[name], value)
    config = TrainConfig.from_dict(data)
    return with_host_folders(config, services)


def _coerce(name: str, kind, value):
    if name == "seed":
        return None if value in (None, "") or int(value) == RANDOM_SEED else int(value)
    try:
        if kind is bool:
            return bool(value)
        if kind is int:
            return int(round(float(value)))
        if kind is float:
            return float(value)
        if kind is str:
            text = "" if value is None else str(value)
            return text.strip() if name in PATH_FIELDS else text
    except (TypeError, ValueError) as error:
        raise UserError(f"{field_info(name).label}: {value!r} is not a number.") from error
    return value
