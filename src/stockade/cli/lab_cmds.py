"""Kernel-lab commands: ``stockade lab demo``.

The demo brings a policy (the bundled example estate by default) up in throw-away
network namespaces, enforces it with a real backend, probes every pair and prints
each real outcome next to the reference evaluator's verdict. Needs root.
"""

from __future__ import annotations

import os
import shutil
import sys

import click

from stockade.cli import main
from stockade.cli.policy_cmds import load, run_or_exit
from stockade.lab.demo import OFFICE_CLIENT, controller_hosts, format_table, run_demo
from stockade.lab.estate import registry_backend
from stockade.paths import example_estate


@main.group()
def lab() -> None:
    """The kernel lab: real namespaces, real firewalls, real probes."""


@lab.command()
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--backend", default="nftables", show_default=True, help="Backend that enforces each workload.")
@click.option("--timeout", default=0.4, show_default=True, type=float, help="Seconds before a probe gives up.")
@click.option("--disagreements-only", is_flag=True, help="Print only probes where kernel and evaluator differ.")
@click.option("--no-office", is_flag=True, help="Do not add the unmanaged office client (10.70.0.200).")
def demo(path: str | None, backend: str, timeout: float, disagreements_only: bool, no_office: bool) -> None:
    """Enforce PATH (default: the example estate) in namespaces and probe every pair.

    Prints from, to, service, v4/v6, the real result, the evaluator's verdict and the
    deciding rule for every probe, then "N probes, M disagreements". Exits 1 on any
    disagreement.
    """
    if os.geteuid() != 0:
        click.echo("error: the lab needs root (network namespaces and nftables)", err=True)
        sys.exit(1)
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            click.echo(f"error: {tool!r} is not installed", err=True)
            sys.exit(1)
    policy = load(path if path is not None else run_or_exit(example_estate))
    unmanaged = ([] if no_office else [OFFICE_CLIENT]) + controller_hosts(policy)
    factory = registry_backend(backend, table="stockade")
    report = run_or_exit(lambda: run_demo(policy, unmanaged=unmanaged, backend=factory, timeout=timeout))
    click.echo(format_table(report, only_disagreements=disagreements_only))
    if report.run.disagreements:
        sys.exit(1)
