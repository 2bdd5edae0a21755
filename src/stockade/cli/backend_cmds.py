"""Backend commands: ``stockade render`` prints a workload's native artifact, ``stockade apply``
enforces it on this host (or in a network namespace) and verifies it by reading it back.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from stockade.backends.base import Artifact, Backend
from stockade.backends.registry import BACKENDS, get_backend
from stockade.cli import main
from stockade.cli.policy_cmds import load, run_or_exit
from stockade.compiler import HostPolicy, compile_host


def _backend_options(table: str | None, netns: str | None, forward: bool, log_group: int | None) -> dict[str, Any]:
    """Only the options the user gave, so backends without them still build."""
    options: dict[str, Any] = {}
    if table is not None:
        options["table"] = table
    if netns is not None:
        options["netns"] = netns
    if forward:
        options["forward"] = True
    if log_group is not None:
        options["log_group"] = log_group
    return options


def _prepare(
    path: str, workload: str, backend_name: str, options: dict[str, Any]
) -> tuple[Backend[Any], HostPolicy, Artifact]:
    policy = load(path)
    host_policy = run_or_exit(lambda: compile_host(policy, workload))
    backend = run_or_exit(lambda: get_backend(backend_name, **options))
    artifact = run_or_exit(lambda: backend.render(host_policy))
    return backend, host_policy, artifact


_backend_choice = click.Choice(sorted(BACKENDS))


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--workload", "-w", required=True, help="Workload whose host policy to render.")
@click.option("--backend", "backend_name", default="nftables", show_default=True, type=_backend_choice)
@click.option("--table", default=None, help="Name of the table the backend owns (default: stockade).")
@click.option("--forward", is_flag=True, help="Also filter forwarded traffic (router/bridge hosts).")
@click.option("--log-group", type=int, default=None, help="NFLOG group for would-be drops (visibility).")
def render(
    path: str, workload: str, backend_name: str, table: str | None, forward: bool, log_group: int | None
) -> None:
    """Print the native artifact enforcing WORKLOAD's policy from PATH (no changes made)."""
    _, _, artifact = _prepare(path, workload, backend_name, _backend_options(table, None, forward, log_group))
    click.echo(artifact.to_text(), nl=False)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--workload", "-w", required=True, help="Workload this host is.")
@click.option("--backend", "backend_name", default="nftables", show_default=True, type=_backend_choice)
@click.option("--netns", default=None, help="Apply inside this network namespace (ip netns name).")
@click.option("--table", default=None, help="Name of the table the backend owns (default: stockade).")
@click.option("--forward", is_flag=True, help="Also filter forwarded traffic (router/bridge hosts).")
@click.option("--log-group", type=int, default=None, help="NFLOG group for would-be drops (visibility).")
def apply(
    path: str,
    workload: str,
    backend_name: str,
    netns: str | None,
    table: str | None,
    forward: bool,
    log_group: int | None,
) -> None:
    """Enforce WORKLOAD's policy from PATH on this host, atomically, then verify it (root)."""
    if os.geteuid() != 0:
        click.echo("error: applying a ruleset needs root", err=True)
        sys.exit(1)
    options = _backend_options(table, netns, forward, log_group)
    backend, host_policy, artifact = _prepare(path, workload, backend_name, options)
    run_or_exit(lambda: backend.apply(artifact))
    where = f" in netns {netns}" if netns else ""
    summary = (
        f"applied {backend.name} policy for {workload} (mode {host_policy.mode.value}, "
        f"{len(host_policy.rules)} rules, {sum(len(s.members) for s in host_policy.sets)} set members){where}"
    )
    verify = getattr(backend, "verify", None)
    if verify is not None:
        report = run_or_exit(lambda: verify(artifact))
        if not report.ok:
            click.echo(summary)
            for problem in report.problems:
                click.echo(f"verify: {problem}", err=True)
            sys.exit(1)
        summary += "; verified"
    click.echo(summary)
