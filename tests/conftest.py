"""Shared fixtures: the built-in tiny model and small image sets the tests draw themselves."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from quick_runs import quick_train_config

from ti_trainer.backends.tiny import tiny_backend
from ti_trainer.cli.demo import draw_image
from ti_trainer.config import TrainConfig
from ti_trainer.embeddings.create import create_embedding

# Two pytest workers on a two-core machine: one torch thread each, or their thread pools fight (measured:
# the analysis tests took 328 s with torch's default threads and 12 s with one).
torch.set_num_threads(1)


def draw_dataset(folder: Path, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shapes, colours = ("circle", "square", "triangle", "stripes"), ("red", "blue", "green", "orange")
    for index in range(count):
        shape, colour = shapes[index % 4], colours[(index // 4 + index) % 4]
        draw_image(shape, colour, size, rng).save(folder / f"{index:02d}-{shape}.png")
        (folder / f"{index:02d}-{shape}.txt").write_text(
            f"a {colour} {shape}, simple shapes", encoding="utf-8"
        )
    return folder


@pytest.fixture
def backend():
    return tiny_backend("v")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return draw_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def module_dataset(tmp_path_factory) -> Path:
    """The `dataset` images drawn once for a test module whose tests share a run."""
    return draw_dataset(tmp_path_factory.mktemp("module") / "data")


def quick_config(
    root: Path, backend, name: str = "testemb", vectors: int = 2, create: bool = True, **overrides
):
    """A TrainConfig for a fast run under `root` (4 drawn images of 64 px, batch 2, 6 steps, a copy every 2),
    with the embedding created first unless `create` is False."""
    embeddings = root / "embeddings"
    if create:
        create_embedding(backend, name, "painting", vectors, embeddings, overwrite=True)
    data = root / "data"
    folders = dict(
        embedding_name=name,
        data_dir=str(data if data.is_dir() else draw_dataset(data)),
        embeddings_dir=str(embeddings),
        log_dir=str(root / "logs"),
    )
    return quick_train_config(**{**folders, **overrides})


@pytest.fixture
def make_config(tmp_path: Path, dataset: Path, backend):
    """`quick_config` under this test's tmp_path, on the `dataset` fixture's images."""

    def make(name: str = "testemb", vectors: int = 2, create: bool = True, **overrides) -> TrainConfig:
        return quick_config(tmp_path, backend, name, vectors, create, **overrides)

    return make
