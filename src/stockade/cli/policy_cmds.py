"""Policy commands: ``check``, ``compile``, ``explain`` (and the offline part of ``demo``).

Every command reads a policy directory (or file) of YAML documents; input errors are
printed one per line as ``file:line: field: message`` and the command exits 1.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import click

from stockade.cli import main
from stockade.cli.controller_cmds import _client, _fail, client_options
from stockade.cli.errors import EXIT_FINDING
from stockade.codec import bodies
from stockade.codec.syntax import ICMP_TYPE_NAMES, BadValue, parse_service_entry
from stockade.compiler import Compiler, HostPolicy, host_policy_to_json
from stockade.errors import StockadeError, ValidationError
from stockade.evaluator import Evaluation, Evaluator, SideDecision, Verdict
from stockade.model import IPAddress, Policy, Proto
from stockade.model.netpol import KubeNetworkPolicy
from stockade.model.rule_ids import rule_title

T = TypeVar("T")


def run_or_exit(action: Callable[[], T]) -> T:
    """Run ``action``; print Stockade errors plainly (never a traceback) and exit 1."""
    try:
        return action()
    except ValidationError as exc:
        for issue in exc.issues:
            click.echo(str(issue), err=True)
        click.echo(f"{len(exc.issues)} error(s)", err=True)
        sys.exit(1)
    except StockadeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def load(path: str | Path) -> Policy:
    from stockade.policyfile import load_policy

    return run_or_exit(lambda: load_policy(path))


PORT_HELP = "expected PORT/tcp, PORT/udp, icmp[:TYPE] or icmpv6[:TYPE] (TYPE a number or a name: echo-request)"


def parse_port(spec: str, version: int = 4) -> tuple[Proto, int | None]:
    """One connection's protocol and port (or ICMP type) in the policy files' port syntax.

    ``icmp`` alone means echo-request, and between IPv6 endpoints (``version`` 6) it is
    ICMPv6 echo-request: the ping of that family. ``icmp:TYPE`` names the type (``icmp:8``,
    ``icmpv6:echo-request``); ranges and bare protocols are not one connection.
    """
    text = spec.strip().lower()
    if text in ("icmp", "icmpv6"):
        proto = Proto.ICMPV6 if text == "icmpv6" or version == 6 else Proto.ICMP
        return proto, ICMP_TYPE_NAMES[proto]["echo-request"]
    try:
        entry = parse_service_entry(text)
    except BadValue as exc:
        raise click.BadParameter(f"{spec!r}: {exc}; {PORT_HELP}") from None
    if entry.first is None or entry.first != entry.last:
        raise click.BadParameter(f"{spec!r}: {PORT_HELP}")
    return entry.proto, entry.first


def resolve_endpoint(policy: Policy, text: str, version: int) -> IPAddress:
    """A workload name (its first address of the family) or a literal IP address."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    for w in policy.workloads:
        if w.name == text:
            for a in w.addresses:
                if a.version == version:
                    return a
            raise click.BadParameter(f"workload {text!r} has no IPv{version} address")
    raise click.BadParameter(f"{text!r} is neither a workload name nor an IP address")


def render_text(hp: HostPolicy) -> str:
    lines = [f"workload {hp.workload}  mode={hp.mode.value}  addresses={', '.join(map(str, hp.local_addresses))}"]
    lines.append(f"{len(hp.rules)} rules (first match wins):")
    for r in hp.rules:
        svc = ",".join(str(e) for e in r.services)
        peer = next((s.selector for s in hp.sets if s.name == r.peer), r.peer)
        arrow = "<-" if r.direction.value == "in" else "->"
        lines.append(f"  {r.action.value:<13} {arrow} {peer:<40} {svc:<20} [{rule_title(r.rule_id)}]")
    lines.append("address sets:")
    for s in hp.sets:
        members = ", ".join(str(m) for m in s.members) or "(empty)"
        lines.append(f"  {s.name}/v{s.family.value} {s.selector}: {members}")
    return "\n".join(lines)


def describe_side(side: SideDecision | None, where: str) -> str:
    if side is None:
        return f"  {where}: unmanaged or idle, no decision"
    if side.encrypted and side.action == "allow":
        return f"  {where} ({side.workload}, {side.mode.value}): allow, encrypted by {rule_title(side.rule_id)}"
    if side.encrypted:
        return (f"  {where} ({side.workload}, {side.mode.value}): {side.action}: {rule_title(side.rule_id)} "
                "says encrypt and the other end cannot run WireGuard (idle, unmanaged or no key)")
    return f"  {where} ({side.workload}, {side.mode.value}): {side.action} by {rule_title(side.rule_id)}"


def describe(ev: Evaluation) -> str:
    verdict = f"verdict: {ev.verdict.value}"
    if ev.encrypted:
        verdict += f", encrypted by {rule_title(ev.encrypted_by)} (WireGuard)"
    return "\n".join([verdict, describe_side(ev.outbound, "outbound"), describe_side(ev.inbound, "inbound")])


@main.command()
@click.argument("path", type=click.Path(exists=True))
def check(path: str) -> None:
    """Validate a policy directory or file; report every error."""
    policy = load(path)
    click.echo(
        f"ok: {len(policy.workloads)} workloads, {len(policy.rulesets)} rulesets, "
        f"{sum(len(r.rules) for r in policy.rulesets)} rules, {len(policy.deny_rules)} deny rules, "
        f"{len(policy.ip_lists)} IP lists, {len(policy.services)} services"
    )


@main.command("compile")
@click.argument("path", type=click.Path(exists=True))
@click.option("--workload", "-w", required=True, help="Workload name.")
@click.option("--format", "fmt", type=click.Choice(["json", "text"]), default="json", show_default=True)
def compile_cmd(path: str, workload: str, fmt: str) -> None:
    """Print the compiled HostPolicy of one workload."""
    policy = load(path)
    hp = run_or_exit(lambda: Compiler(policy).host_policy(workload))
    click.echo(host_policy_to_json(hp) if fmt == "json" else render_text(hp), nl=fmt == "text")


def _decode_netpol(body: object) -> KubeNetworkPolicy:
    decoded: KubeNetworkPolicy = run_or_exit(lambda: bodies.decode("network_policy", body))
    return decoded


def _remote_policy(version: str, controller_url: str | None, api_key: str | None, ca_cert: Path | None) -> Policy:
    """The controller's policy (``draft``, ``active`` or a version number) with its inventory."""
    from stockade.policyfile import load_documents

    with _client(controller_url, api_key, ca_cert) as client:
        r = client.get("/policy/draft", params={"version": version})
        if r.status_code != 200:
            _fail(r)
        policy = run_or_exit(lambda: load_documents(r.text, f"controller:{version}"))
        # Kubernetes NetworkPolicies are live inventory (the cluster sync writes them), not documents
        found: list[KubeNetworkPolicy] = []
        cursor: str | None = None
        while True:
            page = client.get("/network-policies", params={"limit": "500", **({"cursor": cursor} if cursor else {})})
            if page.status_code != 200:
                _fail(page)
            body = page.json()
            for item in body["items"]:
                found.append(_decode_netpol(item["body"]))
            cursor = body.get("next_cursor")
            if not cursor:
                break
    return replace(policy, network_policies=tuple(sorted(found)))


@main.command()
@click.argument("path", type=click.Path(exists=True), required=False)
@click.option("--from", "src", required=True, help="Source workload name or IP address.")
@click.option("--to", "dst", required=True, help="Destination workload name or IP address.")
@click.option("--port", required=True, help="443/tcp, 53/udp, icmp (echo: ICMPv6 with --ipv6), icmpv6:echo-request ...")
@click.option("--ipv6", is_flag=True, help="Use the workloads' IPv6 addresses.")
@click.option("--remote", "remote", default=None, metavar="draft|active|N",
              help="ask the controller's policy instead of PATH (the default without PATH: active)")
@click.option("--exit-code", "exit_code", is_flag=True,
              help="exit 0 when allowed, 1 when blocked or potentially blocked")
@client_options
def explain(path: str | None, src: str, dst: str, port: str, ipv6: bool, remote: str | None, exit_code: bool,
            controller_url: str | None, api_key: str | None, ca_cert: Path | None) -> None:
    """Say whether a connection is allowed, and which rule decides on each side: from the policy in PATH,
    or from a controller's draft, active or numbered version (--remote)."""
    if path is not None and remote is not None:
        raise click.UsageError("give PATH or --remote, not both")
    if path is not None:
        policy = load(path)
    else:
        policy = _remote_policy(remote or "active", controller_url, api_key, ca_cert)
    proto, _ = parse_port(port)  # syntax first
    version = 6 if ipv6 or proto is Proto.ICMPV6 else 4
    s = resolve_endpoint(policy, src, version)
    d = resolve_endpoint(policy, dst, s.version)
    proto, num = parse_port(port, s.version)
    ev = run_or_exit(lambda: Evaluator(policy).evaluate(s, d, proto, num))
    what = f" ({proto.value} type {num})" if proto.is_icmp else ""
    click.echo(f"{src} ({s}) -> {dst} ({d}) {port}{what}")
    click.echo(describe(ev))
    if exit_code and ev.verdict is not Verdict.ALLOWED:
        sys.exit(EXIT_FINDING)


DEMO_FLOWS = (
    ("web-prod-1", "app-prod-1", "8080/tcp"),
    ("app-prod-1", "db-prod-1", "5432/tcp"),
    ("web-prod-1", "db-prod-1", "5432/tcp"),
    ("app-dev-1", "db-prod-1", "5432/tcp"),
    ("mon-1", "db-prod-1", "9100/tcp"),
    ("mon-1", "db-prod-1", "445/tcp"),
)


def run_demo(path: Path) -> str:
    """The offline part of the demo: validate, compile every host, explain a few flows."""
    from stockade.policyfile import load_policy

    policy = load_policy(path)
    comp = Compiler(policy)
    out = [f"example estate: {path}", ""]
    out.append(f"{'workload':<14} {'mode':<11} {'labels':<44} {'rules':>5} {'sets':>5}")
    for name in comp.workload_names:
        hp = comp.host_policy(name)
        w = policy.workload_map()[name]
        labels = " ".join(str(lab) for lab in sorted(w.labels))
        out.append(f"{name:<14} {hp.mode.value:<11} {labels:<44} {len(hp.rules):>5} {len(hp.sets) // 2:>5}")
    out.append("")
    ev = Evaluator(policy)
    names = policy.workload_map()
    for src, dst, port in DEMO_FLOWS:
        if src not in names or dst not in names:
            continue
        proto, num = parse_port(port)
        s = resolve_endpoint(policy, src, 4)
        d = resolve_endpoint(policy, dst, 4)
        out.append(f"{src} -> {dst} {port}")
        out.append(describe(ev.evaluate(s, d, proto, num)))
    return "\n".join(out)
