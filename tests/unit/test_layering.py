"""Imports point one way: model <- compiler <- backends <- agent / controller; nothing imports the controller.

Checked on the source text (ast), so a violation fails even if the import is inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "stockade"

# package -> stockade packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "model": {"errors"},
    "policyfile": {"errors", "model"},
    "compiler": {"errors", "model"},
    "evaluator": {"errors", "model"},
    "backends": {"errors", "model", "compiler", "bpf"},  # bpf: the eBPF C sources and their build
    "visibility": {"errors", "model", "compiler", "evaluator"},
    "lab": {"errors", "model", "compiler", "evaluator", "backends", "policyfile", "paths"},
    "agent": {"errors", "model", "compiler", "evaluator", "backends", "visibility", "logs"},
    "controller": {"errors", "model", "compiler", "evaluator", "policyfile", "visibility", "backends", "web", "logs"},
    "logs": set(),
}


def _stockade_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "stockade" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    files = sorted((SRC / package).rglob("*.py")) if (SRC / package).is_dir() else [SRC / f"{package}.py"]
    assert files, package
    bad = []
    for f in files:
        for imported in _stockade_imports(f) - {package} - ALLOWED[package] - {"__init__"}:
            bad.append(f"{f.relative_to(SRC)} imports stockade.{imported}")
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_controller() -> None:
    offenders = [
        str(f.relative_to(SRC))
        for f in SRC.rglob("*.py")
        if _package_of(f) not in ("controller", "cli") and "controller" in _stockade_imports(f)
    ]
    assert not offenders
