"""The A1111 tests' world: a stand-in of the WebUI's modules holding a tiny real ldm SD 2.x model, or a tiny
SDXL (sgm stand-in around real networks, see tiny_sgm.py).

They run only in .venv-a1111 (the WebUI's pins plus the `ldm` package A1111 runs).
"""

import sys
from pathlib import Path

HERE = Path(__file__).parent
# standin/: the WebUI's `modules` package as the extension sees it (see standin/README.md).
sys.path[:0] = [str(HERE / "standin")]

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from threads; with xdist workers and shared cores they only contend.
torch.set_num_threads(1)
from PIL import Image  # noqa: E402

SHA256 = "a3b1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny SD 2.x 768-v (v-parameterization) LatentDiffusion, built once per test process."""
    import tiny_ldm

    tiny_ldm.register_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))
    return tiny_ldm.build_tiny_sd2("v")


class WebUI:
    """Paths and handles of one stand-in WebUI session (see the `webui` fixture)."""

    def __init__(self, root: Path, model):
        self.root = root
        self.model = model
        self.embeddings_dir = root / "embeddings"
        self.templates_dir = root / "textual_inversion_templates"
        self.data_dir = root / "data"
        for folder in (self.embeddings_dir, self.templates_dir, self.data_dir):
            folder.mkdir()

    @property
    def db(self):
        from modules import sd_hijack

        return sd_hijack.model_hijack.embedding_db


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """What building a tiny SDXL needs on disk (CLIP-L's transformers folder); bigG's architecture registered."""
    import tiny_sgm

    return tiny_sgm.prepare(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_folder):
    """A tiny SDXL DiffusionEngine, built once per test process (tests that change it for good build their own)."""
    import tiny_sgm

    return tiny_sgm.build_tiny_sdxl(tiny_sdxl_folder)


@pytest.fixture
def webui(tmp_path, tiny_sd2, monkeypatch):
    """A fresh stand-in WebUI with the tiny model loaded the WebUI's way (hijacked, embeddings loaded)."""
    yield from webui_session(tmp_path, monkeypatch, tiny_sd2, "tiny-sd2-768-v.safetensors")


@pytest.fixture
def webui_sdxl(tmp_path, tiny_sdxl, monkeypatch):
    """A fresh stand-in WebUI with the tiny SDXL loaded as A1111 loads SDXL (set_model_type, extend_sdxl,
    placement, hijack of both text encoders, embeddings loaded, empty prompt encoded)."""
    yield from webui_session(tmp_path, monkeypatch, tiny_sdxl, "tiny-sdxl.safetensors")


@pytest.fixture
def fresh_sdxl_webui(tmp_path, tiny_sdxl_folder, monkeypatch, request):
    """A WebUI around an SDXL of its own, for start-up choices that change a model for good (hooks, FP8
    weights). Parametrize it indirectly with {"flags": command-line flags, "settings": settings}."""
    import tiny_sgm
    from modules import lowvram

    monkeypatch.setattr(lowvram, "module_in_gpu", None)
    choices = getattr(request, "param", {})
    model = tiny_sgm.build_tiny_sdxl(tiny_sdxl_folder)
    yield from webui_session(tmp_path, monkeypatch, model, "tiny-sdxl.safetensors", **choices)


def webui_session(tmp_path, monkeypatch, model, checkpoint_name, flags=None, settings=None):
    """Set the stand-in WebUI up around `model` (command-line `flags` and `settings` as given at start-up),
    yield its WebUI handle, and unload the model afterwards."""
    from modules import call_queue, devices, processing, script_callbacks, sd_hijack, sd_models, shared

    monkeypatch.chdir(tmp_path)
    webui = WebUI(tmp_path, model)
    fresh = shared.default_options()
    shared.opts.data_labels, shared.opts.data = fresh.data_labels, fresh.data
    vars(shared.cmd_opts).update(
        vars(
            shared.default_cmd_opts(
                embeddings_dir=str(webui.embeddings_dir),
                textual_inversion_templates_dir=str(webui.templates_dir),
                **(flags or {}),
            )
        )
    )
    shared.opts.data.update(settings or {})
    shared.models_path = str(tmp_path / "models")
    vars(shared.state).clear()
    script_callbacks.clear_callbacks()
    processing.conditioning_log.clear()
    db = sd_hijack.model_hijack.embedding_db
    db.clear_embedding_dirs()
    db.add_embedding_dir(str(webui.embeddings_dir))
    checkpoint = sd_models.CheckpointInfo(str(tmp_path / "models" / checkpoint_name), SHA256)
    sd_models.load_model(model, checkpoint)
    yield webui
    with call_queue.queue_lock:  # a training job still running holds it: let it finish first
        sd_models.unload_model(model)
    db.clear_embedding_dirs()
    devices.fp8 = False


@pytest.fixture
def dataset(webui):
    """Three 64x64 images with caption files, in the WebUI session's data folder."""
    rng = np.random.default_rng(0)
    for index, caption in enumerate(["a red square", "a blue circle", "green stripes"]):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            webui.data_dir / f"{index}.png"
        )
        (webui.data_dir / f"{index}.txt").write_text(caption, encoding="utf-8")
    return webui.data_dir


def pytest_configure(config):
    # ldm and pytorch_lightning 1.9 are older than the setuptools and torch they run on here; their
    # deprecation warnings would bury ours.
    for pattern in (
        "ignore:.*rank_zero_only.*",
        "ignore::PendingDeprecationWarning:starlette",
        "ignore:The anyio.abc.BlockingPortal alias:DeprecationWarning",
    ):
        config.addinivalue_line("filterwarnings", pattern)
