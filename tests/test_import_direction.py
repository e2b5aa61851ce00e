"""The floors of the code: each package imports only packages on lower floors (kb is the ground
floor; the CLI and the benchmarks stand on top), and no module imports another module's private
names. Read from the source with ast, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"kb": 0, "ingest": 1, "retrieval": 2, "serve": 3, "finetune": 4, "eval": 4, "ui": 4, "cli": 5, "bench": 6}
"""A package may import packages on lower floors only (finetune, eval and ui share a floor and
import none of each other)."""


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def project_files() -> list[tuple[str, Path]]:
    return [(pkg, f) for pkg in FLOORS for f in sorted((ROOT / pkg).rglob("*.py"))]


def test_packages_import_only_lower_floors():
    wrong = []
    for pkg, path in project_files():
        for module, _ in imports(path):
            top = module.split(".")[0]
            if top in FLOORS and top != pkg and FLOORS[top] >= FLOORS[pkg]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module} ({pkg} is on floor {FLOORS[pkg]}, "
                             f"{top} on {FLOORS[top]})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for _, path in project_files():
        for module, names in imports(path):
            if module.split(".")[0] in FLOORS:
                wrong += [f"{path.relative_to(ROOT)}: from {module} import {n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("pkg", sorted(FLOORS))
def test_every_package_is_on_a_floor(pkg):
    assert (ROOT / pkg).is_dir() and any((ROOT / pkg).glob("*.py"))
    others = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert others <= set(FLOORS), f"packages without a floor: {sorted(others - set(FLOORS))}"
