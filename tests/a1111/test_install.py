"""install.py, as the WebUI runs it at launch: it installs through launch.run_pip only what is missing."""

import ast
import importlib.metadata
import importlib.util
import runpy
from pathlib import Path

import launch  # the stand-in (tests/a1111/standin/launch.py)
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


# --- no torch, nothing present reinstalled, only through the WebUI's pip ---------------------------------

# torch and the packages that are builds of it or pin one: the WebUI chose (and may have patched) its build,
# and a pip install of any of these replaces it with a CPU or mismatched CUDA build.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "xformers", "triton", "pytorch-triton"}


def webui_is_installed(package):
    """launch.is_installed as A1111 v1.10.1 defines it (modules/launch_utils.py)."""
    try:
        return importlib.metadata.distribution(package) is not None
    except importlib.metadata.PackageNotFoundError:
        try:
            return importlib.util.find_spec(package) is not None
        except ModuleNotFoundError:
            return False


def dependency_closure(requirement: Requirement) -> dict[str, str]:
    """Every distribution `requirement` pulls in (with its extras), each with the chain that pulls it.

    Read from the installed metadata of .venv-a1111, the WebUI's pins: a requirement that is not installed
    there cannot be checked, and is reported as such.
    """
    found: dict[str, str] = {}
    stack = [(requirement, requirement.name)]
    while stack:
        current, chain = stack.pop()
        name = canonicalize_name(current.name)
        if name in found and not current.extras:
            continue
        found[name] = chain
        try:
            dist = importlib.metadata.distribution(current.name)
        except importlib.metadata.PackageNotFoundError:
            assert current is not requirement, (
                f"{requirement} is not installed in the WebUI's environment (.venv-a1111): it cannot be "
                "checked for torch; add it to requirements-a1111.txt"
            )
            continue
        for text in dist.requires or []:
            sub = Requirement(text)
            environments = [{"extra": extra} for extra in (current.extras or {""})]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
                stack.append((sub, f"{chain} -> {sub.name}"))
    return found


def test_no_requirement_is_torch_or_pulls_it_in(pip):
    for text in run_install()["REQUIREMENTS"].values():
        requirement = Requirement(text)
        assert canonicalize_name(requirement.name) not in TORCH_FAMILY, text
        pulled = dependency_closure(requirement)
        torch_like = {name: chain for name, chain in pulled.items() if name in TORCH_FAMILY}
        assert not torch_like, f"{text} pulls in {torch_like}"


def test_the_dependency_check_sees_torch_behind_an_extra():
    # The check itself: safetensors is harmless, but its [torch] extra pulls torch.
    assert "torch" not in dependency_closure(Requirement("safetensors==0.4.2"))
    assert "torch" in dependency_closure(Requirement("safetensors[torch]==0.4.2"))


def test_each_requirement_is_keyed_by_the_name_the_webui_finds_it_under(pip):
    for package, text in run_install()["REQUIREMENTS"].items():
        # A key that differs from what is installed would make the WebUI reinstall it at every launch.
        assert canonicalize_name(package) == canonicalize_name(Requirement(text).name), (package, text)


def test_in_the_webuis_own_environment_nothing_is_installed(pip, monkeypatch):
    monkeypatch.setattr(launch, "is_installed", webui_is_installed)
    run_install()
    assert pip.pip_calls == []


def test_pip_is_never_asked_to_upgrade_or_reinstall(pip, monkeypatch):
    monkeypatch.setattr(launch, "installed", set())  # a bare environment: everything is missing
    requirements = run_install()["REQUIREMENTS"]
    assert [command for command, _ in pip.pip_calls] == [f"install {text}" for text in requirements.values()]
    for command, _ in pip.pip_calls:
        words = command.split()
        assert not {"-U", "--upgrade", "--force-reinstall", "--ignore-installed", "-I"} & set(words), command


def test_install_goes_only_through_the_webuis_pip():
    # launch.run_pip honours --skip-install and the artist's index URL; subprocess or pip.main would not.
    tree = ast.parse(INSTALL.read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"launch"}
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert "run_pip" in calls and not calls & {"system", "run", "Popen", "check_call", "main"}
