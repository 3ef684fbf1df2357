"""install.py, as the WebUI runs it at launch: it installs through launch.run_pip only what is missing."""

import runpy
from pathlib import Path

import launch  # the stand-in (tests/a1111/standin/launch.py)
import pytest

INSTALL = Path(__file__).resolve().parents[2] / "install.py"


@pytest.fixture
def pip(monkeypatch):
    monkeypatch.setattr(launch, "pip_calls", [])
    return launch


def run_install():
    return runpy.run_path(str(INSTALL), run_name="__main__")


def test_nothing_is_installed_when_the_webui_has_everything(pip, monkeypatch):
    monkeypatch.setattr(launch, "installed", set(run_install()["REQUIREMENTS"]))
    pip.pip_calls.clear()
    run_install()
    assert pip.pip_calls == []


def test_only_missing_packages_are_installed_with_run_pip(pip, monkeypatch):
    requirements = run_install()["REQUIREMENTS"]
    monkeypatch.setattr(launch, "installed", set(requirements) - {"safetensors", "pandas"})
    pip.pip_calls.clear()
    run_install()
    assert [command for command, _ in pip.pip_calls] == [
        f"install {requirements['safetensors']}",
        f"install {requirements['pandas']}",
    ]


def test_torch_is_never_installed_by_the_extension(pip):
    assert not any(name.lower().startswith("torch") for name in run_install()["REQUIREMENTS"])
