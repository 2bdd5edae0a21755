"""``stockade verify``: prove that what the kernel holds equals a workload's policy, for every packet.

It compiles the workload's HostPolicy from a policy file (or reads a HostPolicy JSON, as the
agent caches it), reads back what the backend has loaded on this host or in a network
namespace, and prints "proven" or one counterexample packet per direction and family that
differs (exit 1). A read-back holding a construct the prover does not model is a failed proof
(exit 1, naming it). See ``docs/verification.md``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from pathlib import Path

import click

from stockade.cli import main
from stockade.cli.policy_cmds import load, run_or_exit
from stockade.compiler import HostPolicy, compile_host
from stockade.compiler.ir import host_policy_from_json
from stockade.errors import Issue, ValidationError
from stockade.model.addresses import IPAddress
from stockade.verify.readback import BACKENDS, prove_loaded


def _host_policy(path: str | None, workload: str | None, host_policy: str | None) -> HostPolicy:
    if host_policy is not None:
        text = Path(host_policy).read_text()
        try:
            return host_policy_from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError([Issue(host_policy, 0, "host policy", f"not a HostPolicy JSON: {exc}")]) from exc
    if path is None or workload is None:
        raise ValidationError([Issue("", 0, "PATH", "give a policy PATH with --workload, or --host-policy FILE")])
    policy = load(path)
    return compile_host(policy, workload)


def _hints(values: tuple[str, ...]) -> list[IPAddress]:
    out: list[IPAddress] = []
    for v in values:
        try:
            out.append(ipaddress.ip_address(v))
        except ValueError as exc:
            raise ValidationError([Issue("", 0, "--hint", f"{v!r} is not an IP address")]) from exc
    return out


_IFNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")


def _wg_interface(name: str | None) -> str | None:
    if name is not None and not _IFNAME.match(name):
        raise ValidationError([Issue("", 0, "--wg-interface", f"{name!r} is not an interface name")])
    return name


@main.command()
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--workload", "-w", default=None, help="Workload whose policy to prove (with PATH).")
@click.option("--host-policy", default=None, type=click.Path(exists=True), help="A HostPolicy JSON instead.")
@click.option("--backend", "backend", default="nftables", show_default=True, type=click.Choice(BACKENDS))
@click.option("--netns", default=None, help="Read back inside this network namespace (ip netns name).")
@click.option("--table", default="stockade", show_default=True, help="nftables: the table Stockade owns.")
@click.option("--wg-interface", default=None,
              help="The WireGuard interface of encrypted rules (their steering is then modelled).")
@click.option("--hint", multiple=True, help="Prefer this peer address in a counterexample (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the proof as JSON.")
def verify(
    path: str | None,
    workload: str | None,
    host_policy: str | None,
    backend: str,
    netns: str | None,
    table: str,
    wg_interface: str | None,
    hint: tuple[str, ...],
    as_json: bool,
) -> None:
    """Prove the loaded ruleset gives every packet the policy's verdict, or show one that differs."""
    hp = run_or_exit(lambda: _host_policy(path, workload, host_policy))
    hints = run_or_exit(lambda: _hints(hint))
    wg = run_or_exit(lambda: _wg_interface(wg_interface))
    proof = run_or_exit(lambda: prove_loaded(hp, backend, netns=netns, table=table, hints=hints, wg_interface=wg))
    if as_json:
        click.echo(json.dumps({
            "backend": proof.backend, "workload": proof.workload, "proven": proof.proven,
            "classes": proof.classes, "seconds": round(proof.seconds, 4), "notes": list(proof.notes),
            "differences": [str(d) for d in proof.differences],
        }, indent=2))
    else:
        click.echo(f"{proof.summary()} in {proof.seconds * 1000:.0f} ms")
        for note in proof.notes:
            click.echo(f"note: {note}")
    if not proof.proven:
        sys.exit(1)
