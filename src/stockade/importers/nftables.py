"""``nft -j list ruleset`` (the libnftables JSON schema) -> Stockade policy.

Reads tables of family ``ip``, ``ip6`` and ``inet``: base chains of type ``filter`` on the
``input`` and ``output`` hooks with every chain they reach (``jump``, ``goto``, ``return``),
matches on ``ip``/``ip6`` ``saddr``/``daddr`` (addresses, prefixes, ranges, anonymous and named
sets, ``!=``), ``meta l4proto``/``ip protocol``/``ip6 nexthdr``, ``tcp``/``udp``/``th dport``
(values, ranges, sets), ICMP/ICMPv6 types, ``ct state``, ``meta iifname/oifname "lo"``,
``meta nfproto``; verdicts accept, drop, reject (as a drop), return, jump, goto, and verdict maps
(``vmap``, anonymous or named) whose key is one of those matches. Several base chains on one hook
are chained in priority order (an accept in an earlier chain only moves on to the next one).
``forward`` and ``prerouting``/``postrouting`` chains, and bridge/arp/netdev tables, are out of
scope. Anything else (``meta mark``, ``limit``, ``xt`` compat, source ports...) is named in the report
and leaves the host in visibility mode. Objects that cannot be read are reported with their JSON path.
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stockade.codec.syntax import ICMP_TYPE_NAMES
from stockade.importers.chains import (
    ANY_ENTRIES,
    BaseChain,
    Direction,
    Flattener,
    HostRules,
    Kind,
    Match,
    RawRule,
    Verdict,
)
from stockade.importers.report import Finding, ImportResult, Origin, Outcome
from stockade.importers.source import ImportOptions, Source
from stockade.importers.translate import translate
from stockade.model.addresses import AddressRanges, Family, merge_ranges
from stockade.model.services import Proto, ServiceEntry

HOOKS = {"input": Direction.INBOUND, "output": Direction.OUTBOUND}
FAMILIES = {"ip": (Family.V4,), "ip6": (Family.V6,), "inet": (Family.V4, Family.V6)}
L4 = {"tcp": Proto.TCP, "udp": Proto.UDP, "icmp": Proto.ICMP, "icmpv6": Proto.ICMPV6, "ipv6-icmp": Proto.ICMPV6,
      6: Proto.TCP, 17: Proto.UDP, 1: Proto.ICMP, 58: Proto.ICMPV6}


class Unsupported(Exception):
    """An expression Stockade cannot match on (the message names it)."""


class Bad(Exception):
    """An object that does not follow the schema (the message says how)."""


@dataclass
class _Chain:
    table: tuple[str, str]
    name: str
    hook: str = ""
    ctype: str = ""
    prio: int = 0
    policy: str = "accept"
    origin: Origin = field(default_factory=lambda: Origin(""))
    rules: list[tuple[list[Any], Origin]] = field(default_factory=list)


@dataclass
class _Ruleset:
    chains: dict[tuple[str, str, str], _Chain] = field(default_factory=dict)
    sets: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)


def _load(source: Source, host: str, findings: list[Finding]) -> _Ruleset:
    rs = _Ruleset()
    try:
        doc = json.loads(source.text)
    except json.JSONDecodeError as exc:
        findings.append(Finding(Outcome.BAD_INPUT, Origin(source.name, exc.lineno), host, "JSON", exc.msg))
        return rs
    items = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        findings.append(Finding(Outcome.BAD_INPUT, Origin(source.name, path="/"), host, "document",
                                "expected {\"nftables\": [...]} (nft -j list ruleset)"))
        return rs
    skipped: dict[str, int] = defaultdict(int)
    for i, item in enumerate(items):
        origin = Origin(source.name, path=f"/nftables/{i}")
        if not isinstance(item, dict) or len(item) != 1:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, "object", "expected one key per object"))
            continue
        (kind, body), = item.items()
        if kind in ("metainfo", "table"):
            continue
        if not isinstance(body, dict) or not isinstance(body.get("family"), str) or \
                not isinstance(body.get("table"), str):
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, kind, "needs family and table"))
            continue
        if body["family"] not in FAMILIES:
            skipped[body["family"]] += 1
            continue
        table = (body["family"], body["table"])
        try:
            if kind == "chain":
                name = _text(body, "name")
                rs.chains[(*table, name)] = _Chain(table, name, str(body.get("hook", "")), str(body.get("type", "")),
                                                   int(body.get("prio", 0)), str(body.get("policy", "accept")), origin)
            elif kind in ("set", "map"):
                rs.sets[(*table, _text(body, "name"))] = body
            elif kind == "rule":
                key = (*table, _text(body, "chain"))
                expr = body.get("expr")
                if not isinstance(expr, list):
                    raise Bad("a rule needs an expr list")
                if key not in rs.chains:
                    raise Bad(f"rule of unknown chain {key[2]!r}")
                rs.chains[key].rules.append((expr, origin))
        except (Bad, ValueError, TypeError) as exc:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, kind, str(exc)))
    for fam, count in sorted(skipped.items()):
        findings.append(Finding(Outcome.OUT_OF_SCOPE, Origin(source.name, path="/nftables"), host,
                                f"family {fam} ({count} objects)", "only ip, ip6 and inet tables filter host traffic"))
    return rs


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        raise Bad(f"{key} must be a string")
    return value


@dataclass
class _Builder:
    """nft expressions -> RawRules for one direction and family."""

    rs: _Ruleset
    table: tuple[str, str]
    direction: Direction
    family: Family
    accept_as_return: bool = False
    prefix: str = ""

    def addresses(self, value: Any) -> AddressRanges | None:
        """None: the value is of the other family (the match can never be true)."""
        if isinstance(value, str) and value.startswith("@"):
            named = self.rs.sets.get((*self.table, value[1:]))
            if named is None:
                raise Bad(f"no set named {value[1:]!r}")
            return self.addresses({"set": named.get("elem", [])})
        if isinstance(value, dict) and "set" in value:
            parts = [self.addresses(v) for v in value["set"]]
            kept = [p for p in parts if p is not None]
            return AddressRanges(merge_ranges(r for p in kept for r in p.v4),
                                 merge_ranges(r for p in kept for r in p.v6)) if kept else None
        if isinstance(value, dict) and "elem" in value:
            return self.addresses(value["elem"].get("val"))
        if isinstance(value, dict) and "prefix" in value:
            net = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
            return AddressRanges.of([net]) if net.version == self.family.value else None
        if isinstance(value, dict) and "range" in value:
            lo, hi = (ipaddress.ip_address(v) for v in value["range"])
            if lo.version != self.family.value:
                return None
            r = ((int(lo), int(hi)),)
            return AddressRanges(r, ()) if lo.version == 4 else AddressRanges((), r)
        if isinstance(value, str):
            net = ipaddress.ip_network(value)
            return AddressRanges.of([net]) if net.version == self.family.value else None
        raise Bad(f"cannot read {json.dumps(value)[:60]} as addresses")

    def ports(self, value: Any) -> list[tuple[int, int]]:
        if isinstance(value, int):
            return [(value, value)]
        if isinstance(value, str) and value.startswith("@"):
            named = self.rs.sets.get((*self.table, value[1:]))
            if named is None:
                raise Bad(f"no set named {value[1:]!r}")
            return self.ports({"set": named.get("elem", [])})
        if isinstance(value, dict) and "set" in value:
            return [p for v in value["set"] for p in self.ports(v)]
        if isinstance(value, dict) and "range" in value:
            lo, hi = value["range"]
            return [(int(lo), int(hi))]
        if isinstance(value, dict) and "elem" in value:
            return self.ports(value["elem"].get("val"))
        raise Bad(f"cannot read {json.dumps(value)[:60]} as ports")

    def build(self, expr: list[Any], origin: Origin, text: str) -> list[RawRule]:
        conds: dict[str, Any] = {"peer": None, "local": None, "protos": None, "ports": None, "icmp": None,
                                 "names": ()}
        inexpressible: list[str] = []
        notes: list[str] = []
        flags = {"loopback": False, "established": False, "invalid": False, "never": False}
        for j, e in enumerate(expr):
            if not isinstance(e, dict) or len(e) != 1:
                raise Bad(f"expr[{j}]: expected one key")
            (op, body), = e.items()
            if op == "match":
                self._match(body, conds, inexpressible, flags)
            elif op in ("counter", "comment"):
                continue
            elif op == "log":
                notes.append("log is not carried (Stockade records every first packet's verdict itself)")
            elif op in ("accept", "drop", "reject", "return", "jump", "goto", "continue"):
                kind, target = self._verdict(op, body)
                if op == "reject":
                    notes.append("reject becomes a drop (the peer sees a timeout, not a refusal)")
                return [self._rule(kind, target, conds, inexpressible, notes, flags, origin, text)]
            elif op == "vmap":
                return self._vmap(body, conds, inexpressible, notes, flags, origin, text)
            else:
                inexpressible.append(op)
        return [self._rule(Kind.NOOP, "", conds, inexpressible, notes, flags, origin, text)]

    def _verdict(self, op: str, body: Any) -> tuple[Kind, str]:
        if op == "accept":
            return (Kind.RETURN if self.accept_as_return else Kind.ACCEPT), ""
        if op in ("drop", "reject"):
            return Kind.DROP, ""
        if op == "return":
            return Kind.RETURN, ""
        if op in ("jump", "goto"):
            return (Kind.JUMP if op == "jump" else Kind.GOTO), self.prefix + str(body["target"])
        return Kind.NOOP, ""

    def _vmap(self, body: dict[str, Any], conds: dict[str, Any], inexpressible: list[str], notes: list[str],
              flags: dict[str, bool], origin: Origin, text: str) -> list[RawRule]:
        data = body.get("data")
        if isinstance(data, str) and data.startswith("@"):
            named = self.rs.sets.get((*self.table, data[1:]))
            if named is None:
                raise Bad(f"no map named {data[1:]!r}")
            data = {"set": named.get("elem", [])}
        if not isinstance(data, dict) or not isinstance(data.get("set"), list):
            raise Bad("vmap data must be a set of [key, verdict] pairs")
        out: list[RawRule] = []
        for k, (key, verdict) in enumerate(data["set"]):
            (vop, vbody), = verdict.items()
            sub = dict(conds)
            sub_flags = dict(flags)
            sub_inexp = list(inexpressible)
            self._match({"op": "==", "left": body["key"], "right": key}, sub, sub_inexp, sub_flags)
            kind, target = self._verdict(vop, vbody)
            out.append(self._rule(kind, target, sub, sub_inexp, notes, sub_flags,
                                  Origin(origin.file, path=f"{origin.path}/vmap/{k}"),
                                  f"{text} vmap {json.dumps(key)}"))
        return out

    def _match(self, body: dict[str, Any], conds: dict[str, Any], inexpressible: list[str],
               flags: dict[str, bool]) -> None:
        left, right, op = body.get("left"), body.get("right"), body.get("op", "==")
        neg = op == "!="
        if op not in ("==", "!=", "in"):
            inexpressible.append(f"operator {op}")
            return
        if isinstance(left, dict) and "payload" in left:
            proto, fld = left["payload"].get("protocol"), left["payload"].get("field")
            if proto in ("ip", "ip6") and fld in ("saddr", "daddr"):
                if (proto == "ip") != (self.family is Family.V4):
                    flags["never"] = True
                    return
                ranges = self.addresses(right)
                if ranges is None:
                    flags["never"] = not neg
                    return
                if neg:
                    ranges = AddressRanges.of([ipaddress.ip_network("0.0.0.0/0" if self.family is Family.V4
                                                                    else "::/0")]).minus(ranges)
                peer_side = (fld == "saddr") == (self.direction is Direction.INBOUND)
                slot = "peer" if peer_side else "local"
                conds[slot] = ranges if conds[slot] is None else conds[slot].minus(conds[slot].minus(ranges))
                if peer_side and isinstance(right, str) and right.startswith("@") and not neg:
                    conds["names"] = (right[1:],)
                return
            if proto in ("ip", "ip6") and fld in ("protocol", "nexthdr"):
                if (proto == "ip") != (self.family is Family.V4):
                    flags["never"] = True
                    return
                self._protos(right, neg, conds, inexpressible)
                return
            if proto in ("tcp", "udp", "th") and fld == "dport":
                if neg:
                    inexpressible.append(f"{proto} dport != ...")
                    return
                if proto != "th":
                    self._protos(proto, False, conds, inexpressible)
                conds["ports"] = self.ports(right)
                return
            if proto in ("icmp", "icmpv6") and fld == "type":
                fam = Family.V4 if proto == "icmp" else Family.V6
                if fam is not self.family:
                    flags["never"] = True
                    return
                iproto = L4[proto]
                values = right["set"] if isinstance(right, dict) and "set" in right else [right]
                types = [v if isinstance(v, int) else ICMP_TYPE_NAMES[iproto].get(str(v)) for v in values]
                if neg or any(t is None for t in types):
                    inexpressible.append(f"{proto} type {json.dumps(right)}")
                    return
                conds["protos"] = [iproto]
                conds["icmp"] = types
                return
            inexpressible.append(f"{proto} {fld}")
            return
        if isinstance(left, dict) and "meta" in left:
            key = left["meta"].get("key")
            if key == "l4proto":
                self._protos(right, neg, conds, inexpressible)
            elif key in ("iifname", "oifname", "iif", "oif"):
                if right == "lo" and not neg:
                    flags["loopback"] = True
                elif right != "lo":
                    inexpressible.append(f"meta {key} {'!= ' if neg else ''}{right}")
            elif key == "nfproto":
                want = Family.V4 if right == "ipv4" else Family.V6
                if (want is self.family) == neg:
                    flags["never"] = True
            else:
                inexpressible.append(f"meta {key}")
            return
        if isinstance(left, dict) and "ct" in left and left["ct"].get("key") == "state":
            states = set(right if isinstance(right, list) else right["set"] if isinstance(right, dict) else [right])
            if not neg and states <= {"established", "related"}:
                flags["established"] = True
            elif not neg and states == {"invalid"}:
                flags["invalid"] = True
            elif not neg and "new" in states and states <= {"new", "established", "related"}:
                pass
            else:
                inexpressible.append(f"ct state {op} {sorted(states)}")
            return
        inexpressible.append(json.dumps(left)[:60])

    def _protos(self, value: Any, neg: bool, conds: dict[str, Any], inexpressible: list[str]) -> None:
        values = value["set"] if isinstance(value, dict) and "set" in value else [value]
        protos = [L4.get(v) for v in values]
        if neg or any(p is None for p in protos):
            inexpressible.append(f"l4proto {'!= ' if neg else ''}{json.dumps(value)}")
            return
        conds["protos"] = [Proto.ICMPV6 if p is Proto.ICMP and self.family is Family.V6 else p for p in protos]

    def _rule(self, kind: Kind, target: str, conds: dict[str, Any], inexpressible: list[str], notes: list[str],
              flags: dict[str, bool], origin: Origin, text: str) -> RawRule:
        if flags["never"]:
            return RawRule(kind, None, origin, text)
        protos: list[Proto] | None = conds["protos"]
        entries: tuple[ServiceEntry, ...] = ANY_ENTRIES
        if protos is not None or conds["ports"] is not None:
            protos = protos or [Proto.TCP, Proto.UDP]
            out: set[ServiceEntry] = set()
            for p in protos:
                if p.has_ports and conds["ports"] is not None:
                    out |= {ServiceEntry(p, max(1, a), b) for a, b in conds["ports"]}
                elif p.is_icmp and conds["icmp"] is not None:
                    out |= {ServiceEntry(p, t, t) for t in conds["icmp"]}
                elif not (conds["ports"] is not None and not p.has_ports):
                    out.add(ServiceEntry(p))
            entries = tuple(sorted(out))
        match = Match(self.family, conds["peer"], conds["local"], entries, conds["names"])
        inexp = list(inexpressible)
        if flags["loopback"]:
            if kind is Kind.ACCEPT and not inexp:
                return RawRule(Kind.NOOP, match, origin, text, note="loopback is always allowed by the failsafe",
                               note_outcome=Outcome.CARRIED)
            inexp.append("loopback interface (the failsafe always allows loopback)")
        if flags["established"]:
            if kind is Kind.ACCEPT and not inexp:
                return RawRule(Kind.NOOP, match, origin, text, note="established/related traffic is always allowed "
                               "by the failsafe", note_outcome=Outcome.CARRIED)
            inexp.append("ct state established/related (always allowed by the failsafe)")
        if flags["invalid"]:
            if kind is Kind.DROP and not inexp:
                return RawRule(Kind.NOOP, match, origin, text, note="Stockade does not match ct state invalid: such "
                               "packets meet the rules like new ones (connection-level policy unchanged)")
            inexp.append("ct state invalid")
        uncond = conds["peer"] is None and conds["local"] is None and entries == ANY_ENTRIES and not inexp
        return RawRule(kind, match, origin, text, target, tuple(inexp), uncond, "; ".join(notes))


def _describe(expr: list[Any]) -> str:
    return json.dumps(expr, separators=(",", ":"))[:160]


def _host_rules(host: str, rs: _Ruleset, findings: list[Finding]) -> HostRules:
    out_chains: list[BaseChain] = []
    visibility = False
    families: set[Family] = set()
    all_findings = list(findings)
    for (_, table, name), chain in sorted(rs.chains.items()):
        if chain.hook and chain.hook not in HOOKS and chain.ctype == "filter":
            all_findings.append(Finding(Outcome.OUT_OF_SCOPE, chain.origin, host, f"chain {table}/{name} "
                                        f"(hook {chain.hook}, {len(chain.rules)} rules)",
                                        "routed or translated traffic is not the host's own"))
    for family in (Family.V4, Family.V6):
        for hook, direction in HOOKS.items():
            bases = sorted((c for c in rs.chains.values() if c.hook == hook and c.ctype == "filter"
                            and family in FAMILIES[c.table[0]]), key=lambda c: (c.prio, c.table, c.name))
            if not bases:
                continue
            families.add(family)
            raw: dict[str, list[RawRule]] = defaultdict(list)
            top: list[RawRule] = []
            default = Verdict.ACCEPT
            for i, base in enumerate(bases):
                last = i == len(bases) - 1
                prefix = f"{i}:{base.table[0]}:{base.table[1]}:"
                builder = _Builder(rs, base.table, direction, family, accept_as_return=not last, prefix=prefix)
                for (f2, t2, n2), c in rs.chains.items():
                    if (f2, t2) != base.table:
                        continue
                    raw[prefix + n2] = []
                    for expr, origin in c.rules:
                        try:
                            raw[prefix + n2].extend(builder.build(expr, origin, _describe(expr)))
                        except (Bad, ValueError, TypeError, KeyError, AttributeError) as exc:
                            all_findings.append(Finding(Outcome.BAD_INPUT, origin, host, _describe(expr),
                                                        str(exc) or type(exc).__name__))
                everything = Match(family)
                top.append(RawRule(Kind.JUMP, everything, base.origin, f"chain {base.table[1]}/{base.name}",
                                   prefix + base.name))
                if base.policy == "drop":
                    if last:
                        default = Verdict.DROP
                    else:
                        top.append(RawRule(Kind.DROP, everything, base.origin, f"chain {base.name} policy drop"))
            raw["@hook"] = top
            flat = Flattener(raw, host)
            rules = flat.flatten("@hook", Match(family))
            all_findings.extend(flat.findings)
            visibility = visibility or flat.visibility
            out_chains.append(BaseChain(direction, family, default, tuple(rules), bases[-1].origin,
                                        tuple(flat.left_out)))
    seen: set[Finding] = set()
    unique = [f for f in all_findings if not (f in seen or seen.add(f))]  # type: ignore[func-returns-value]
    return HostRules(host, tuple(out_chains), tuple(unique), visibility, tuple(sorted(families)))


def import_nftables(sources: Sequence[Source], options: ImportOptions) -> ImportResult:
    """Each file is one host's ``nft -j list ruleset``."""
    return translate(nftables_host_rules(sources, options), options.addresses, backend=options.backend)


def nftables_host_rules(sources: Sequence[Source], options: ImportOptions) -> list[HostRules]:
    """Each host's flattened first-match chains (what the import translates and verify samples)."""
    hosts = []
    for host, files in options.by_host(sources):
        findings: list[Finding] = []
        merged = _Ruleset()
        for s in files:
            rs = _load(s, host, findings)
            merged.chains.update(rs.chains)
            merged.sets.update(rs.sets)
        hosts.append(_host_rules(host, merged, findings))
    return hosts
