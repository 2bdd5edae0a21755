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
    "codec": {"errors", "model"},  # documents (YAML nodes or REST JSON) <-> domain: below both entry points
    "policyfile": {"errors", "model", "codec"},
    "compiler": {"errors", "model"},
    "evaluator": {"errors", "model"},
    "backends": {"errors", "model", "compiler", "bpf"},  # bpf: the eBPF C sources and their build
    "visibility": {"errors", "model", "compiler", "evaluator"},
    # read-back parsers use the backends' runners; bpf: the eBPF object whose tag the proof checks
    "verify": {"errors", "model", "compiler", "backends", "bpf"},
    "lab": {"errors", "model", "compiler", "evaluator", "backends", "codec", "policyfile", "paths", "importers"},
    "agent_signature": {"errors"},  # the agent request signature, shared by agent and controller
    "agent_session": {"errors", "agent_signature"},  # its session MAC (the same message, keyed by a session)
    "agent": {
        "errors", "model", "compiler", "evaluator", "backends", "visibility", "logs", "agent_signature", "verify",
        "agent_session",
    },
    "controller": {
        "errors", "model", "compiler", "evaluator", "codec", "policyfile", "visibility", "backends", "web", "logs",
        "agent_signature", "agent_session", "importers",
    },
    # existing firewall rules -> policy, pure, below the controller (k8s: its NetworkPolicy translation)
    "importers": {"errors", "model", "codec", "policyfile", "k8s"},
    "logs": set(),
    # the sync (beside the controller: reaches it only through the REST API; writes REST bodies with the one
    # codec; the NetworkPolicy import writes policy documents with the one dumper, policyfile) and the node
    # agent (an agent runtime per pod on the node, with its backends); never the controller
    "k8s": {"errors", "model", "compiler", "codec", "policyfile", "agent", "agent_signature", "agent_session",
            "backends"},
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


# ---- inside backends/: families are islands over a few shared modules -------------------------

BACKENDS_DIR = SRC / "backends"
# What every family may use. Not the registry: through it a family could reach any other family.
SHARED_BACKEND_MODULES = {"base", "common", "conntrack", "flowlog", "nfnetlink", "portgroups", "setalgebra",
                          "sockets", "wireguard"}


def _families() -> list[str]:
    return sorted(p.name for p in BACKENDS_DIR.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def _backend_modules_imported(path: Path) -> set[str]:
    """The ``stockade.backends.<name>`` modules/packages a file imports (``<name>`` only)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[:2] == ["stockade", "backends"]:
                if len(parts) > 2:
                    found.add(parts[2])
                else:  # from stockade.backends import flowlog
                    found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["stockade", "backends"] and len(parts) > 2:
                    found.add(parts[2])
    return found


def test_backend_families_exist() -> None:
    assert {"nftables", "iptables", "ebpf", "windows", "ipfilter", "f5"} <= set(_families())
    shared = {p.stem for p in BACKENDS_DIR.glob("*.py")} - {"__init__"}
    assert shared >= SHARED_BACKEND_MODULES


@pytest.mark.parametrize("family", _families())
def test_backend_families_do_not_import_each_other(family: str) -> None:
    bad = [
        f"{f.relative_to(SRC)} imports stockade.backends.{name}"
        for f in sorted((BACKENDS_DIR / family).rglob("*.py"))
        for name in sorted(_backend_modules_imported(f) - {family} - SHARED_BACKEND_MODULES)
    ]
    assert not bad, "\n".join(bad)


def test_shared_backend_modules_import_no_family() -> None:
    families = set(_families())
    bad = [
        f"backends/{name}.py imports stockade.backends.{imported}"
        for name in sorted(SHARED_BACKEND_MODULES)
        for imported in sorted(_backend_modules_imported(BACKENDS_DIR / f"{name}.py") & families)
    ]
    assert not bad, "\n".join(bad)


def test_the_registry_imports_no_family() -> None:
    """It names them as ``module:Class`` strings and imports one on lookup (tests/unit/test_backends.py)."""
    assert not _backend_modules_imported(BACKENDS_DIR / "registry.py") & set(_families())


# Routes parse, authorise and shape answers; queries live in controller/services and controller/storage.
QUERY_CALLS = {"select", "insert", "update", "delete", "execute", "scalar", "scalars", "get", "query", "add",
               "merge", "text"}


def test_controller_routes_run_no_sql() -> None:
    bad = []
    for f in sorted((SRC / "controller" / "api").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sqlalchemy")
                    and (node.module != "sqlalchemy.orm" or any(a.name != "Session" for a in node.names))):
                bad.append(f"{f.name}:{node.lineno} imports {node.module}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "db"
                    and node.func.attr in QUERY_CALLS):
                bad.append(f"{f.name}:{node.lineno} runs db.{node.func.attr}()")
    assert not bad, "\n".join(bad)


# FlowQuery is a query-string model whose to_filter() resolves labels against the flow store: route logic.
ROUTE_MODELS_ALLOWED = {"flows.py": {"FlowQuery"}}


def test_route_modules_define_no_bodies() -> None:
    """Request and response bodies live in controller/api/dto (per route module) or api/schemas (shared)."""
    bad = []
    for f in sorted((SRC / "controller" / "api").glob("*.py")):
        if f.name == "schemas.py":
            continue
        for node in ast.parse(f.read_text()).body:
            if (isinstance(node, ast.ClassDef) and any(isinstance(b, ast.Name) and b.id in ("BaseModel", "Strict")
                                                       for b in node.bases)
                    and node.name not in ROUTE_MODELS_ALLOWED.get(f.name, set())):
                bad.append(f"{f.name}:{node.lineno} defines {node.name}")
    assert not bad, "\n".join(bad)
