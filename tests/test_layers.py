"""The package's layering, read from its imports: no module imports a module of a higher layer.

Layers, lowest first (a module may import its own layer and any lower one): the utilities, data/,
training/ (the shared trainer, below every model that uses it), tokenizers/, the two stages (which do not
import each other), sampling/, evaluation/, the recipe, the planner and the sweep, the CLI.
"""

from __future__ import annotations

import ast

from conftest import REPO

LAYERS = [
    {"__init__", "errors", "progress", "io", "config", "distributed", "checkpoints", "runstate", "visual", "identity",
     "stopping", "provenance", "checks"},
    {"data"},
    {"training"},
    {"tokenizers"},
    {"discrete"},  # the two stages share a layer: checked separately below
    {"continuous"},
    {"sampling"},
    {"evaluation"},
    {"recipe"},
    {"plan", "sweep"},  # command-level modules beside the recipe
    {"cli", "__main__"},
]
STAGES = {"discrete", "continuous"}


def _room(module: str) -> str:
    """d2ctool.data.shards -> data; d2ctool.io -> io; d2ctool -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    """(importing module, imported module) for every d2ctool import in the package, at any depth."""
    package = REPO / "d2ctool"
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = module.split(".") if parts[-1] == "__init__" else module.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
                if base == "d2ctool":  # `from d2ctool import X`: X is a module, or a name of d2ctool/__init__
                    yield from ((module, f"d2ctool.{a.name}" if any((package / a.name).with_suffix(s).exists()
                                                                   for s in ("", ".py")) else "d2ctool")
                                for a in node.names)
                elif base.startswith("d2ctool"):
                    yield module, base
            elif isinstance(node, ast.Import):
                yield from ((module, a.name) for a in node.names if a.name.startswith("d2ctool"))


def _layer(room: str) -> int:
    (index,) = [i for i, rooms in enumerate(LAYERS) if room in rooms]
    return 4 if room in STAGES else index


def upward_imports() -> list[str]:
    found = []
    for importer, imported in _imports():
        a, b = _room(importer), _room(imported)
        if a == b:
            continue
        if _layer(b) > _layer(a) or {a, b} == STAGES:
            found.append(f"{importer} imports {imported}")
    return sorted(set(found))


def test_every_module_has_a_layer():
    rooms = {_room(importer) for importer, _ in _imports()} | {p.stem for p in (REPO / "d2ctool").glob("*.py")}
    assert rooms <= set().union(*LAYERS), rooms - set().union(*LAYERS)


def test_no_import_runs_back_up_a_layer():
    assert upward_imports() == []
