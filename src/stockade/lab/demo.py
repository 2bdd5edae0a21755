"""``stockade lab demo``: the example estate enforced in namespaces, every probe shown.

``run_demo`` loads a policy directory, brings every workload up as a lab host (plus
unmanaged hosts: an office client and the controller by default), enforces each
workload's compiled host policy with the nftables backend, probes every ordered pair
on the estate's service ports (and the failsafe ports), and returns the checks;
``format_table`` prints them with the evaluator's verdict and deciding rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stockade.lab.estate import (
    BackendFactory,
    Check,
    EstateLab,
    EstateRun,
    PortPlan,
    hosts_for_policy,
    plan_probes,
    service_label,
    service_ports,
)
from stockade.lab.lab import DEFAULT_TIMEOUT
from stockade.model.addresses import IPAddress
from stockade.model.policy import Policy
from stockade.model.services import Proto

OFFICE_CLIENT: tuple[str, tuple[IPAddress, ...]] = (
    "office-client",
    (ipaddress.ip_address("10.70.0.200"), ipaddress.ip_address("fd70::c8")),
)


@dataclass(frozen=True)
class DemoReport:
    policy: Policy
    plan: PortPlan
    run: EstateRun


def controller_hosts(policy: Policy) -> list[tuple[str, tuple[IPAddress, ...]]]:
    """An unmanaged ``controller`` host at the failsafe's single-address controller entries."""
    addrs = tuple(n.network_address for n in policy.failsafe.controller if n.num_addresses == 1)
    return [("controller", addrs)] if addrs else []


def failsafe_ports(policy: Policy) -> tuple[int, ...]:
    ports = [e.first for e in policy.failsafe.management if e.proto is Proto.TCP and e.first is not None]
    if policy.failsafe.controller:
        ports.append(policy.failsafe.controller_port)
    return tuple(ports)


def run_demo(
    policy: Policy,
    *,
    unmanaged: Sequence[tuple[str, Sequence[IPAddress]]] | None = None,
    backend: BackendFactory | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> DemoReport:
    """Enforce ``policy`` in a fresh lab, probe every pair, tear the lab down, report."""
    extra = list(unmanaged) if unmanaged is not None else [OFFICE_CLIENT, *controller_hosts(policy)]
    plan = service_ports(policy)
    plan = PortPlan(tuple(sorted({*plan.tcp, *failsafe_ports(policy)})), plan.udp, plan.icmp_echo)
    hosts = hosts_for_policy(policy, tcp_ports=plan.tcp, udp_ports=plan.udp, unmanaged=extra)
    with EstateLab(hosts, backend=backend) as estate:
        run = estate.run(policy, plan_probes(hosts, plan), timeout=timeout)
    return DemoReport(policy, plan, run)


def load_example_policy(path: str | Path | None = None) -> Policy:
    from stockade.paths import example_estate
    from stockade.policyfile import load_policy

    return load_policy(Path(path) if path is not None else example_estate())


HEADER = ("from", "to", "service", "port", "ip", "real", "evaluator", "deciding rule", "")


def table_rows(report: DemoReport, *, only_disagreements: bool = False) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c in report.run.checks:
        if only_disagreements and c.agrees:
            continue
        p = c.probe
        rows.append(
            (
                p.src_host,
                p.dst_host,
                service_label(report.policy, p),
                p.service_text(),
                f"v{p.family.value}",
                "connected" if c.result.succeeded else c.result.outcome.value,
                c.evaluation.verdict.value,
                c.deciding_rule,
                "" if c.agrees else "DISAGREE",
            )
        )
    return rows


def format_table(report: DemoReport, *, only_disagreements: bool = False) -> str:
    body = table_rows(report, only_disagreements=only_disagreements)
    if not body:
        return report.run.summary()
    rows = [HEADER, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    lines.append("")
    lines.append(report.run.summary())
    return "\n".join(lines)


def disagreement_lines(checks: Sequence[Check]) -> list[str]:
    return [c.describe() for c in checks]
