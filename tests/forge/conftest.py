"""The Forge tests' world: a stand-in of Forge's `modules`, `modules_forge` and `backend` packages (see
standin/README.md) holding a tiny real SD 2.x (or 1.x) model loaded from a checkpoint file in inference mode,
as Forge loads it.

The stand-in's `modules` and tests/a1111's share a name, so these tests run in a pytest process apart from
tests/a1111 and tests/ui (`make test-a1111` does so); collected beside them, the session stops with that
message.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE / "standin"), str(HERE)]

torch.set_num_threads(1)  # tiny models gain nothing from threads; with xdist workers they only contend

SHA256 = "f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f"


A1111_STANDIN_USERS = ("a1111", "ui")  # test folders that put tests/a1111's `modules` on the path


def pytest_collection_modifyitems(config, items):
    tests = HERE.parent
    clashing = sorted(
        {
            folder
            for item in items
            for folder in A1111_STANDIN_USERS
            if (tests / folder) in Path(item.path).parents
        }
    )
    if clashing:
        raise pytest.UsageError(
            "tests/forge runs in a pytest process of its own: its stand-in's `modules` package and A1111's "
            f"share a name. Run `pytest tests/forge` apart from {', '.join('tests/' + f for f in clashing)}."
        )


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny checkpoints on disk: SD 2.x v-prediction, SD 1.x and SDXL epsilon, written once per test process."""
    import tiny_forge

    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "sd2": tiny_forge.write_tiny_checkpoint(folder / "sd2", "sd2", "v_prediction"),
        "sd1": tiny_forge.write_tiny_checkpoint(folder / "sd1", "sd1", "epsilon"),
        "sdxl": tiny_forge.write_tiny_checkpoint(folder / "sdxl", "sdxl", "epsilon"),
    }


class Forge:
    """Paths and handles of one stand-in Forge session (see the `forge` fixture)."""

    def __init__(self, root: Path):
        self.root = root
        self.embeddings_dir = root / "embeddings"
        self.templates_dir = root / "textual_inversion_templates"
        self.data_dir = root / "data"
        for folder in (self.embeddings_dir, self.templates_dir, self.data_dir):
            folder.mkdir()

    @property
    def model(self):
        from modules import shared

        return shared.sd_model

    @property
    def engine(self):
        return self.model.text_processing_engine

    @property
    def engines(self):
        """The text engines, each with its embedding database: SD 1.x/2.x's one, SDXL's clip_l and clip_g."""
        model = self.model
        if getattr(model, "is_sdxl", False):
            return [model.text_processing_engine_l, model.text_processing_engine_g]
        return [model.text_processing_engine]

    def load(self):
        """Load the checkpoint as Forge's first generation does."""
        from modules import sd_models

        return sd_models.forge_model_reload()[0]


def forge_session(tmp_path, monkeypatch, checkpoint: Path, flags=None, settings=None, load=True):
    from backend import memory_management
    from modules import call_queue, processing, script_callbacks, sd_models, shared

    monkeypatch.chdir(tmp_path)
    forge = Forge(tmp_path)
    fresh = shared.default_options()
    shared.opts.data_labels, shared.opts.data = fresh.data_labels, fresh.data
    vars(shared.cmd_opts).update(
        vars(
            shared.default_cmd_opts(
                embeddings_dir=str(forge.embeddings_dir),
                textual_inversion_templates_dir=str(forge.templates_dir),
                **(flags or {}),
            )
        )
    )
    shared.opts.data.update(settings or {})
    shared.models_path = str(tmp_path / "models")
    vars(shared.state).clear()
    script_callbacks.clear_callbacks()
    processing.conditioning_log.clear()
    memory_management.current_loaded_models.clear()
    monkeypatch.setattr(memory_management, "current_inference_memory", 1024**3)
    sd_models.model_data.__init__()
    sd_models.model_data.forge_loading_parameters = {
        "checkpoint_info": sd_models.CheckpointInfo(checkpoint, SHA256)
    }
    if load:
        forge.load()
    yield forge
    with call_queue.queue_lock:  # a training job still running holds it: let it finish first
        memory_management.current_loaded_models.clear()
        sd_models.model_data.__init__()


@pytest.fixture
def forge(tmp_path, tiny_checkpoints, monkeypatch):
    """A fresh stand-in Forge with the tiny SD 2.x v model loaded (in inference mode, embeddings read)."""
    yield from forge_session(tmp_path, monkeypatch, tiny_checkpoints["sd2"])


@pytest.fixture
def forge_sd1(tmp_path, tiny_checkpoints, monkeypatch):
    """A fresh stand-in Forge with the tiny SD 1.x epsilon model loaded."""
    yield from forge_session(tmp_path, monkeypatch, tiny_checkpoints["sd1"])


@pytest.fixture
def forge_xl(tmp_path, tiny_checkpoints, monkeypatch):
    """A fresh stand-in Forge with the tiny SDXL (epsilon) loaded."""
    yield from forge_session(tmp_path, monkeypatch, tiny_checkpoints["sdxl"])


@pytest.fixture
def forge_unloaded(tmp_path, tiny_checkpoints, monkeypatch):
    """A fresh stand-in Forge before its first generation: `shared.sd_model` is the FakeInitialModel."""
    yield from forge_session(tmp_path, monkeypatch, tiny_checkpoints["sd2"], load=False)


def write_dataset(folder: Path) -> Path:
    """Three 64x64 images with caption files in `folder`."""
    rng = np.random.default_rng(0)
    for index, caption in enumerate(["a red square", "a blue circle", "green stripes"]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption, encoding="utf-8")
    return folder


@pytest.fixture
def dataset(forge):
    """Three 64x64 images with caption files, in the session's data folder."""
    return write_dataset(forge.data_dir)


@pytest.fixture
def dataset_xl(forge_xl):
    """The same images in the SDXL session's data folder."""
    return write_dataset(forge_xl.data_dir)


def pytest_configure(config):
    for pattern in (
        "ignore::PendingDeprecationWarning:starlette",
        "ignore:The anyio.abc.BlockingPortal alias:DeprecationWarning",
    ):
        config.addinivalue_line("filterwarnings", pattern)
