"""The panels' fixtures: a standalone host over the built-in tiny model, in a fresh workspace per test; and one
over the built-in tiny SDXL, shared by a module's tests."""

from __future__ import annotations

import pytest
import torch
from quick_runs import quick_settings

from ti_trainer.host.standalone import standalone_services
from ti_trainer.ui.train_form import form_fields, form_values, initial_config

# The tiny model's steps are milliseconds of work; with several threads per process on a shared 2-core CI
# machine (pytest -n 2, other suites) they stall each other and a step takes seconds instead.
torch.set_num_threads(1)


@pytest.fixture
def services(tmp_path):
    return standalone_services(tmp_path / "workspace", model="tiny", device="cpu")


@pytest.fixture(scope="module")
def xl_services(tmp_path_factory):
    """A standalone host over the built-in tiny SDXL, one per test module: its model is built once (a second or
    two), so the module's tests share the workspace and each uses embedding names of its own."""
    return standalone_services(tmp_path_factory.mktemp("xl") / "workspace", model="tiny-sdxl", device="cpu")


def quick_form(services, name: str, data_dir, **overrides) -> tuple[list[str], list]:
    """Form values (in form_fields() order) for a quick run of `name` on `services`' model and the images in
    `data_dir`: 4 steps, copies, previews and validation every 2; override by field name."""
    config = initial_config(services)
    settings = quick_settings(
        embedding_name=name,
        data_dir=str(data_dir),
        max_steps=4,
        preview_every=2,
        preview_steps=2,
        validate_every=2,
        seed=3,
    )
    settings.update(overrides)
    for key, value in settings.items():
        setattr(config, key, value)
    names = form_fields()
    return names, form_values(config, names)


@pytest.fixture
def train_values(services, dataset):
    """`quick_form` on the tiny model and the `dataset` fixture's images."""

    def make(name: str, **overrides) -> tuple[list[str], list]:
        return quick_form(services, name, **{"data_dir": dataset, **overrides})

    return make


@pytest.fixture(scope="module")
def xl_train_values(xl_services, module_dataset):
    """`quick_form` on the tiny SDXL and the module's images."""

    def make(name: str, **overrides) -> tuple[list[str], list]:
        return quick_form(xl_services, name, **{"data_dir": module_dataset, **overrides})

    return make
