"""A Windows Firewall export (``Get-NetFirewallRule`` with its filters, as JSON) -> Stockade policy.

The export is the JSON the PowerShell command in ``docs/migration.md`` writes:
``{"Host": ..., "Profiles": [{Name, Enabled, DefaultInboundAction, DefaultOutboundAction}],
"Rules": [{Name, DisplayName, Direction, Action, Enabled, Profile, LocalAddress, RemoteAddress,
Protocol, LocalPort, RemotePort, IcmpType, Program, Service}]}`` (enum values as names or numbers).

Windows semantics: a block rule beats every allow rule; what no rule matches gets the profile's
default (inbound block, outbound allow unless configured). That is the first-match list "blocks,
then allows, then the default", which :mod:`stockade.importers.translate` turns into policy.
The active network profile is not known from the export, so an allow rule is imported only when
it applies in every enabled profile (else left out: narrower), a block rule always, and a
direction's default is block if any enabled profile blocks. Program and service filters, address
keywords (``LocalSubnet``...), port keywords (``RPC``...), ICMP codes and source ports cannot be
expressed: named in the report, and the host stays in visibility mode.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

from stockade.importers.chains import ANY_ENTRIES, BaseChain, Direction, HostRules, Match, OrderedRule, Verdict
from stockade.importers.report import Finding, ImportResult, Origin, Outcome
from stockade.importers.source import ImportOptions, Source
from stockade.importers.translate import translate
from stockade.model.addresses import AddressRanges, Family
from stockade.model.services import Proto, ServiceEntry

DIRECTIONS = {"inbound": Direction.INBOUND, "1": Direction.INBOUND, "outbound": Direction.OUTBOUND,
              "2": Direction.OUTBOUND}
ACTIONS = {"allow": Verdict.ACCEPT, "2": Verdict.ACCEPT, "block": Verdict.DROP, "4": Verdict.DROP}
PROFILE_BITS = {"domain": 1, "private": 2, "public": 4}
PROTOCOLS = {"any": Proto.ANY, "tcp": Proto.TCP, "6": Proto.TCP, "udp": Proto.UDP, "17": Proto.UDP,
             "icmpv4": Proto.ICMP, "1": Proto.ICMP, "icmpv6": Proto.ICMPV6, "58": Proto.ICMPV6}


class Inexpressible(Exception):
    pass


def _list(value: Any) -> list[str]:
    if value is None:
        return ["Any"]
    if isinstance(value, list):
        return [str(v) for v in value] or ["Any"]
    return [str(value)]


def _profiles(value: Any) -> int:
    text = str(value).lower()
    if text.isdigit():
        return int(text) or 7
    if text in ("any", ""):
        return 7
    return sum(PROFILE_BITS.get(p.strip(), 0) for p in text.split(","))


def _addresses(values: list[str], family: Family) -> AddressRanges | None:
    if any(v.lower() in ("any", "*") for v in values):
        return None
    nets: list[Any] = []
    for v in values:
        if "-" in v:
            lo, hi = (ipaddress.ip_address(x.strip()) for x in v.split("-", 1))
            if lo.version == family.value:
                nets += list(ipaddress.summarize_address_range(lo, hi))
            continue
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise Inexpressible(f"address keyword {v!r}") from None
        if net.version == family.value:
            nets.append(net)
    return AddressRanges.of(nets)


def _ports(values: list[str]) -> list[tuple[int, int]] | None:
    if any(v.lower() == "any" for v in values):
        return None
    out = []
    for v in values:
        lo, _, hi = v.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            raise Inexpressible(f"port keyword {v!r}")
        out.append((int(lo), int(hi or lo)))
    return out


def _entries(rule: dict[str, Any], direction: Direction, family: Family) -> tuple[ServiceEntry, ...]:
    proto_text = str(rule.get("Protocol", "Any")).lower()
    if proto_text not in PROTOCOLS:
        raise Inexpressible(f"protocol {rule.get('Protocol')}")
    proto = PROTOCOLS[proto_text]
    service_ports = _ports(_list(rule.get("LocalPort" if direction is Direction.INBOUND else "RemotePort")))
    source_ports = _ports(_list(rule.get("RemotePort" if direction is Direction.INBOUND else "LocalPort")))
    if source_ports is not None:
        raise Inexpressible("source ports")
    if proto is Proto.ANY:
        return ANY_ENTRIES
    if proto.is_icmp:
        if (proto is Proto.ICMP) != (family is Family.V4):
            return ()
        types = _list(rule.get("IcmpType"))
        if any(t.lower() == "any" for t in types):
            return (ServiceEntry(proto),)
        out = []
        for t in types:
            if not t.isdigit():
                raise Inexpressible(f"ICMP type {t!r} (a code, or not a number)")
            out.append(ServiceEntry(proto, int(t), int(t)))
        return tuple(sorted(set(out)))
    if service_ports is None:
        return (ServiceEntry(proto),)
    return tuple(sorted({ServiceEntry(proto, max(a, 1), b) for a, b in service_ports}))


def _host(source: Source, options: ImportOptions, doc: dict[str, Any]) -> HostRules:
    host = options.host_of(source) if options.host or not isinstance(doc.get("Host"), str) else \
        ImportOptions(host=str(doc["Host"])).host_of(source)
    findings: list[Finding] = []
    profiles = doc.get("Profiles") or []
    enabled = 0
    defaults = {Direction.INBOUND: Verdict.ACCEPT, Direction.OUTBOUND: Verdict.ACCEPT}
    for p in profiles if isinstance(profiles, list) else []:
        if not isinstance(p, dict) or str(p.get("Enabled", "True")).lower() not in ("true", "1"):
            continue
        enabled |= _profiles(p.get("Name", "any"))
        if str(p.get("DefaultInboundAction", "Block")).lower() in ("block", "notconfigured", "4", "0"):
            defaults[Direction.INBOUND] = Verdict.DROP
        if str(p.get("DefaultOutboundAction", "Allow")).lower() in ("block", "4"):
            defaults[Direction.OUTBOUND] = Verdict.DROP
    if not profiles:
        enabled, defaults[Direction.INBOUND] = 7, Verdict.DROP
        findings.append(Finding(Outcome.APPROXIMATED, Origin(source.name, path="/Profiles"), host, "profiles",
                                "no profiles in the export: Windows' defaults assumed (inbound block, outbound allow)"))
    blocks: dict[tuple[Direction, Family], list[OrderedRule]] = {}
    allows: dict[tuple[Direction, Family], list[OrderedRule]] = {}
    visibility = False
    rules = doc.get("Rules")
    if isinstance(rules, dict):
        rules = [rules]  # ConvertTo-Json writes a lone rule as an object
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        origin = Origin(source.name, path=f"/Rules/{i}")
        if not isinstance(rule, dict):
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, "rule", "expected an object"))
            continue
        name = str(rule.get("DisplayName") or rule.get("Name") or f"rule {i}")
        if str(rule.get("Enabled", "True")).lower() not in ("true", "1"):
            continue
        direction = DIRECTIONS.get(str(rule.get("Direction", "")).lower())
        verdict = ACTIONS.get(str(rule.get("Action", "")).lower())
        if direction is None or verdict is None:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, name,
                                    "Direction must be Inbound/Outbound and Action Allow/Block"))
            continue
        try:
            for field in ("Program", "Service"):
                if str(rule.get(field) or "Any").lower() not in ("any", "", "none"):
                    raise Inexpressible(f"{field} {rule.get(field)}")
            if verdict is Verdict.ACCEPT and _profiles(rule.get("Profile", "Any")) & enabled != enabled:
                findings.append(Finding(Outcome.APPROXIMATED, origin, host, name,
                                        f"applies only in profile {rule.get('Profile')}, not in every enabled one: "
                                        "left out (narrower)"))
                continue
            built = []
            for family in (Family.V4, Family.V6):
                remote = _addresses(_list(rule.get("RemoteAddress")), family)
                local = _addresses(_list(rule.get("LocalAddress")), family)
                entries = _entries(rule, direction, family)
                if (remote is not None and remote.is_empty()) or (local is not None and local.is_empty()) \
                        or not entries:
                    continue
                names = (str(rule.get("Name") or name),) if remote else ()
                built.append((family, Match(family, remote, local, entries, names)))
        except Inexpressible as exc:
            visibility = True
            if verdict is Verdict.ACCEPT:
                note = "the allow is left out (never wider); the host stays in visibility mode"
                findings.append(Finding(Outcome.NOT_EXPRESSIBLE, origin, host, name, f"cannot match {exc}: {note}"))
                continue
            findings.append(Finding(Outcome.NOT_EXPRESSIBLE, origin, host, name,
                                    f"cannot match {exc}: the block is kept for all traffic of its direction "
                                    "(narrower); the host stays in visibility mode"))
            built = [(f, Match(f)) for f in (Family.V4, Family.V6)]
        except ValueError as exc:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, name, str(exc)))
            continue
        target = allows if verdict is Verdict.ACCEPT else blocks
        for family, match in built:
            target.setdefault((direction, family), []).append(OrderedRule(verdict, match, origin, name))
    chains = tuple(
        BaseChain(d, f, defaults[d], tuple(blocks.get((d, f), []) + allows.get((d, f), [])),
                  Origin(source.name, path="/Profiles"))
        for f in (Family.V4, Family.V6) for d in Direction
    )
    return HostRules(host, chains, tuple(findings), visibility)


def import_windows(sources: Sequence[Source], options: ImportOptions) -> ImportResult:
    """Each file is one host's export."""
    hosts: list[HostRules] = []
    bad: list[Finding] = []
    for s in sources:
        try:
            doc = json.loads(s.text.lstrip("\ufeff"))
        except json.JSONDecodeError as exc:
            bad.append(Finding(Outcome.BAD_INPUT, Origin(s.name, exc.lineno), options.host_of(s), "JSON", exc.msg))
            continue
        if not isinstance(doc, dict) or "Rules" not in doc:
            bad.append(Finding(Outcome.BAD_INPUT, Origin(s.name, path="/"), options.host_of(s), "document",
                               "expected {\"Profiles\": [...], \"Rules\": [...]} (see docs/migration.md)"))
            continue
        hosts.append(_host(s, options, doc))
    return translate(hosts, options.addresses, bad, options.backend)
