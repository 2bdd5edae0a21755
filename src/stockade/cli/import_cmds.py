"""``stockade import KIND FILE... -o DIR``: existing firewall rules -> policy as code + a report.

Writes ``DIR/policy.yaml`` (what ``stockade check`` and ``stockade policy apply -f`` read) and
``DIR/import-report.txt`` / ``DIR/import-report.json`` (carried over, approximated, not
expressible, out of scope, bad input; each with its file and line or JSON path).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from stockade.cli import main
from stockade.cli.errors import EXIT_FINDING, EXIT_USAGE, CliError
from stockade.cli.policy_cmds import run_or_exit
from stockade.codec.syntax import BadValue, parse_workload_address
from stockade.importers import IMPORTERS, ImportOptions, Outcome, Source, report_json, report_text, run_import
from stockade.importers.source import MAX_SOURCE_BYTES
from stockade.model import IPAddress
from stockade.policyfile import dump_policy, load_documents


def parse_address_options(values: tuple[str, ...], host: str | None) -> dict[str, tuple[IPAddress, ...]]:
    """``HOST=ADDR[,ADDR]`` (or a bare ``ADDR[,ADDR]`` with ``--host``) -> each host's addresses."""
    out: dict[str, list[IPAddress]] = {}
    for value in values:
        name, sep, addrs = value.rpartition("=")
        if not sep:
            if not host:
                raise CliError(f"--address {value!r}: write HOST=ADDR (or give --host)", EXIT_USAGE)
            name = host
        try:
            out.setdefault(name, []).extend(parse_workload_address(a.strip()) for a in addrs.split(",") if a.strip())
        except BadValue as exc:
            raise CliError(f"--address {value!r}: {exc}", EXIT_USAGE) from None
    return {k: tuple(v) for k, v in out.items()}


@main.command("import")
@click.argument("kind", type=click.Choice(sorted(IMPORTERS)))
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory to write policy.yaml and the import report into")
@click.option("--host", default=None, help="host name for every file (default: each file's name up to its first dot)")
@click.option("--address", "addresses", multiple=True, metavar="HOST=ADDR[,ADDR]",
              help="a host's own addresses (repeatable); its workload gets them, peers naming them become labels")
@click.option("--backend", default=None,
              help="backend setting of the imported hosts' workloads (default: none, each agent's own --backend)")
@click.option("--force", is_flag=True, help="overwrite an existing policy.yaml")
@click.option("--verify", is_flag=True,
              help="root: load the original ruleset and Stockade's policy in two lab namespaces, probe both "
                   "(TCP/UDP/ICMP, v4/v6, across every rule), report equal/different per probe; exit 1 if any differ")
@click.option("--verify-backend", default="nftables", show_default=True,
              help="the Linux backend that enforces Stockade's side in --verify")
def import_cmd(kind: str, files: tuple[Path, ...], out_dir: Path, host: str | None, addresses: tuple[str, ...],
               backend: str | None, force: bool, verify: bool, verify_backend: str) -> None:
    """Import existing rules (iptables-save + ipset save, nft -j list ruleset, a Windows Firewall export, an
    Illumio PCE export, Kubernetes NetworkPolicy YAML) as Stockade policy YAML plus a report. Nothing is
    imported wider than the original; hosts with constructs Stockade cannot express are left in visibility
    mode."""
    target = out_dir / "policy.yaml"
    if target.exists() and not force:
        raise CliError(f"{target} exists", EXIT_USAGE, "pass --force to overwrite it")
    sources = []
    for f in files:
        if f.stat().st_size > MAX_SOURCE_BYTES:
            raise CliError(f"{f} is larger than {MAX_SOURCE_BYTES} bytes", EXIT_USAGE)
        sources.append(Source(str(f), f.read_text(encoding="utf-8", errors="replace")))
    options = ImportOptions(host, parse_address_options(addresses, host), backend)
    result = run_or_exit(lambda: run_import(kind, sources, options))
    text = dump_policy(result.policy)
    run_or_exit(lambda: load_documents(text, str(target)))  # what we write must load
    out_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    (out_dir / "import-report.txt").write_text(report_text(result))
    (out_dir / "import-report.json").write_text(report_json(result))
    counts = ", ".join(f"{o.value}: {result.count(o)}" for o in Outcome)
    click.echo(f"wrote {target} ({len(result.policy.workloads)} workloads, {len(result.policy.rulesets)} rulesets, "
               f"{len(result.policy.deny_rules)} deny rules); report in {out_dir / 'import-report.txt'}")
    click.echo(counts)
    for finding in result.findings:
        if finding.outcome in (Outcome.NOT_EXPRESSIBLE, Outcome.BAD_INPUT):
            click.echo(str(finding), err=True)
    if verify:
        _verify(kind, sources, options, host, verify_backend, out_dir)


def _verify(kind: str, sources: list[Source], options: ImportOptions, host: str | None, backend: str,
            out_dir: Path) -> None:
    if os.geteuid() != 0:
        raise CliError("--verify needs root (it builds network namespaces)", EXIT_USAGE)
    from stockade.lab.importverify import verify_import

    report = run_or_exit(lambda: verify_import(kind, sources, options, host, backend))
    (out_dir / "verify-report.txt").write_text(report.text())
    wider = sum(r.wider for r in report.rows)
    click.echo(f"verify: {len(report.rows)} probes, {len(report.rows) - len(report.different)} equal, "
               f"{len(report.different)} different ({wider} wider); per probe in {out_dir / 'verify-report.txt'}")
    for row in report.different:
        click.echo(f"verify: different: {row.probe}: original {row.original.value}, stockade {row.stockade.value} "
                   f"[{row.rule}]", err=True)
    if report.different:
        sys.exit(EXIT_FINDING)
