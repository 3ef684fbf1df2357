"""The panels' fixtures: a standalone host over the built-in tiny model, in a fresh workspace per test."""

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


@pytest.fixture
def train_values(services, dataset):
    """Form values (in form_fields() order) for a quick run on the tiny model; override by field name."""

    def make(name: str, **overrides) -> tuple[list[str], list]:
        config = initial_config(services)
        settings = quick_settings(
            embedding_name=name,
            data_dir=str(dataset),
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

    return make
