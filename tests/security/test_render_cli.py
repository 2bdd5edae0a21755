"""``stockade render`` works for every backend of the registry (issue 12, item 11: f5 crashed).

Each backend renders a workload that only receives connections (what every backend, including
F5's inbound-only virtual servers, can enforce); an option a backend does not take, and an
F5 render of a workload with outbound rules, are clear errors (exit 1, no traceback).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from stockade.backends.registry import BACKENDS
from stockade.cli import main

POLICY = """\
apiVersion: stockade.io/v1
kind: Service
name: https
ports: [443/tcp]
---
apiVersion: stockade.io/v1
kind: Workload
name: vs-web
labels: {role: web, env: prod}
interfaces: [{name: eth0, addresses: [10.9.0.10, fd09::10]}]
mode: full
---
apiVersion: stockade.io/v1
kind: Workload
name: client
labels: {role: app, env: prod}
interfaces: [{name: eth0, addresses: [10.9.0.20]}]
mode: full
---
apiVersion: stockade.io/v1
kind: Ruleset
name: web
scope: [{labels: {env: prod}}]
rules:
  - consumers: [{labels: {role: app}}]
    providers: [{labels: {role: web}}]
    services: [https]
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_renders_through_the_cli(policy: Path, backend: str) -> None:
    result = CliRunner().invoke(main, ["render", str(policy), "-w", "vs-web", "--backend", backend])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    assert "10.9.0.20" in result.output or "vs-web" in result.output or "443" in result.output


def test_f5_render_names_the_virtual_server(policy: Path) -> None:
    result = CliRunner().invoke(main, ["render", str(policy), "-w", "vs-web", "--backend", "f5",
                                       "--virtual", "/Tenant/vs_shop"])
    assert result.exit_code == 0, result.output
    assert "/Tenant/vs_shop" in result.output


@pytest.mark.parametrize("args", [
    ["-w", "client", "--backend", "f5"],  # outbound rules: an F5 virtual server cannot enforce them
    ["-w", "vs-web", "--backend", "f5", "--table", "x"],
    ["-w", "vs-web", "--backend", "nftables", "--virtual", "/Common/x"],
])
def test_render_refusals_are_clear_errors(policy: Path, args: list[str]) -> None:
    result = CliRunner().invoke(main, ["render", str(policy), *args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def test_apply_of_a_device_backend_is_a_clear_error(policy: Path) -> None:
    from stockade.cli.backend_cmds import _check_constructible
    from stockade.errors import ValidationError

    with pytest.raises(ValidationError, match="applied by the controller"):
        _check_constructible("f5", {})
    for name in sorted(set(BACKENDS) - {"f5"}):
        _check_constructible(name, {})
