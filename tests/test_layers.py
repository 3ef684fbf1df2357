"""The package's layers: no module imports from a layer above its own, and no modules import each other in a
circle. Every import counts, the ones inside functions too: a late import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ti_trainer"
# Bottom up (DESIGN.md): plain values, then the core's parts, backends, the VRAM estimate, the loop, analysis,
# the launcher that wires a run, and the faces (hosts with their API and jobs, the CLI, the panels).
LAYERS = [
    ("errors", "fsutil", "config", "diffusion", "images", "progress"),
    ("text", "embeddings", "memory"),
    ("backends",),
    ("vram",),  # the VRAM estimate: a backend's step on the meta device (training/fit.py asks it lazily)
    ("training", "prepare"),  # prepare stands beside training (docs/architecture.md): each uses the other
    ("analysis",),
    ("launch",),
    ("host", "cli", "ui", "__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next((index for index, names in enumerate(LAYERS) if top in names), 0)


def imports_of(path: Path) -> set[str]:
    """The package's modules that `path` imports (a `from package import module` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    # `from ti_trainer.cli import main` also names the package ti_trainer.cli: keep the module only.
    return {name for name in found if not any(other.startswith(name + ".") for other in found)}


GRAPH = {module: imports_of(path) - {module} for module, path in MODULES.items()}


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{module} -> {imported}"
        for module, imported_set in GRAPH.items()
        for imported in imported_set
        if layer_of(imported) > layer_of(module)
    ]
    assert not upward, upward


def test_no_modules_import_each_other_in_a_circle():
    circles = []
    for start in GRAPH:
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, route = stack.pop()
            for imported in GRAPH[module]:
                if imported == start:
                    circles.append(" -> ".join([*route, start]))
                elif imported not in seen:
                    seen.add(imported)
                    stack.append((imported, [*route, imported]))
    assert not circles, circles
