"""Backend commands: ``stockade render`` prints a workload's native artifact, ``stockade apply``
enforces it on this host (or in a network namespace) and verifies it by reading it back.

Every backend of the registry renders here, including the ones the controller applies to a
device (F5 BIG-IP: ``--virtual`` names the virtual server; rendering needs no connection).
A backend whose constructor needs settings this command cannot give (a device's address and
credentials) is refused with a clear error naming them, never a ``TypeError``.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import click

from stockade.backends.base import Artifact, Backend, check_capabilities
from stockade.backends.f5.backend import F5_CAPABILITIES
from stockade.backends.f5.render import BACKEND_NAME as F5_NAME
from stockade.backends.f5.render import render_f5, without_controller_failsafe
from stockade.backends.registry import BACKENDS, get_backend
from stockade.cli import main
from stockade.cli.policy_cmds import load, run_or_exit
from stockade.compiler import Compiler, HostPolicy, compile_host
from stockade.errors import Issue, StockadeError, ValidationError
from stockade.model.workloads import DEFAULT_RENDER_BACKEND


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


def _check_constructible(backend_name: str, options: dict[str, Any]) -> None:
    """A ValidationError naming the settings ``backend_name`` needs that the command lacks."""
    params = inspect.signature(BACKENDS[backend_name]).parameters.values()
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise ValidationError([Issue("", 0, f"backend {backend_name}",
                                     f"needs {', '.join(missing)}: it is applied by the controller to a device, "
                                     "not on this host") ])


def _render_for_device(backend_name: str, host_policy: HostPolicy, options: dict[str, Any]) -> Artifact | None:
    """The artifact of a backend applied to a device (no connection needed); None for host backends."""
    if backend_name != F5_NAME:
        return None
    hp = without_controller_failsafe(host_policy)
    check_capabilities(F5_NAME, F5_CAPABILITIES, hp)
    return render_f5(hp, str(options.get("virtual") or f"/Common/{host_policy.workload}"))


def _prepare(
    path: str, workload: str, backend_name: str, options: dict[str, Any]
) -> tuple[Backend[Any], HostPolicy, Artifact]:
    policy = load(path)
    host_policy = run_or_exit(lambda: compile_host(policy, workload))
    run_or_exit(lambda: _check_constructible(backend_name, options))
    backend = run_or_exit(lambda: get_backend(backend_name, **options))
    artifact = run_or_exit(lambda: backend.render(host_policy))
    return backend, host_policy, artifact


_backend_choice = click.Choice(sorted(BACKENDS))


ARTIFACT_SUFFIX = {"nftables": "nft", "iptables": "rules", "ebpf": "json", "windows": "ps1", "ipfilter": "conf",
                   "f5": "json"}


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--workload", "-w", default=None, help="Workload whose host policy to render.")
@click.option("--all", "all_workloads", is_flag=True,
              help="Render every workload with its own backend (or --backend) into -o DIR: a native fallback.")
@click.option("-o", "--output", "out_dir", default=None, type=click.Path(file_okay=False),
              help="with --all: the directory to write WORKLOAD.<suffix> files into")
@click.option("--backend", "backend_name", default=None, type=_backend_choice,
              help="Backend to render with [default: nftables; with --all each workload's own]")
@click.option("--table", default=None, help="Name of the table the backend owns (default: stockade).")
@click.option("--forward", is_flag=True, help="Also filter forwarded traffic (router/bridge hosts).")
@click.option("--log-group", type=int, default=None, help="NFLOG group for would-be drops (visibility).")
@click.option("--virtual", default=None, help="F5: full path of the virtual server (default: /Common/WORKLOAD).")
def render(
    path: str,
    workload: str | None,
    all_workloads: bool,
    out_dir: str | None,
    backend_name: str | None,
    table: str | None,
    forward: bool,
    log_group: int | None,
    virtual: str | None,
) -> None:
    """Print the native artifact enforcing WORKLOAD's policy from PATH (no changes made), or with
    ``--all -o DIR`` write every workload's artifact into DIR."""
    if all_workloads:
        if workload is not None or out_dir is None or virtual is not None:
            click.echo("error: --all takes -o DIR and no --workload/--virtual", err=True)
            sys.exit(2)
        _render_all(path, Path(out_dir), backend_name, _backend_options(table, None, forward, log_group))
        return
    if workload is None:
        click.echo("error: give --workload NAME (or --all -o DIR)", err=True)
        sys.exit(2)
    backend_name = backend_name or "nftables"
    options = _backend_options(table, None, forward, log_group)
    if backend_name == F5_NAME:
        if options:
            run_or_exit(lambda: _unsupported_options(backend_name, options))
        host_policy = run_or_exit(lambda: compile_host(load(path), workload))
        device_artifact = run_or_exit(lambda: _render_for_device(backend_name, host_policy, {"virtual": virtual}))
        assert device_artifact is not None
        click.echo(device_artifact.to_text(), nl=False)
        return
    if virtual is not None:
        run_or_exit(lambda: _unsupported_options(backend_name, {"virtual": virtual}))
    _, _, artifact = _prepare(path, workload, backend_name, options)
    click.echo(artifact.to_text(), nl=False)


def _render_all(path: str, out_dir: Path, backend_name: str | None, options: dict[str, Any]) -> None:
    """Every workload's artifact into ``out_dir`` (each with its own backend unless one is given)."""
    policy = load(path)
    compiler = run_or_exit(lambda: Compiler(policy))
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for w in sorted(policy.workloads, key=lambda w: w.name):
        name = backend_name or w.backend or DEFAULT_RENDER_BACKEND
        try:
            host_policy = compiler.host_policy(w.name)
            device = _render_for_device(name, host_policy, {})
            if device is not None:
                text = device.to_text()
            else:
                _check_constructible(name, options)
                text = get_backend(name, **options).render(host_policy).to_text()
        except StockadeError as exc:
            failed += 1
            click.echo(f"{w.name}: {exc}", err=True)
            continue
        target = out_dir / f"{w.name}.{name}.{ARTIFACT_SUFFIX.get(name, 'txt')}"
        target.write_text(text)
    click.echo(f"wrote {len(policy.workloads) - failed} artifact(s) to {out_dir}"
               + (f"; {failed} failed" if failed else ""))
    if failed:
        sys.exit(1)


def _unsupported_options(backend_name: str, options: dict[str, Any]) -> None:
    raise ValidationError([Issue("", 0, f"backend {backend_name}", f"does not take option --{o.replace('_', '-')}")
                           for o in sorted(options)])


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
