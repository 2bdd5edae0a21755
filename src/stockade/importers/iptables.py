"""``iptables-save`` / ``ip6tables-save`` (+ ``ipset save``) -> Stockade policy.

Reads the ``*filter`` table: INPUT and OUTPUT with every user chain they reach (jumps, gotos,
RETURN), ``-s``/``-d`` (lists, ``!``), ``-p``, ``--dport``/``multiport``, ICMP types, conntrack
and state matches, ``-m set`` with the sets of an ``ipset save`` file, ``-i lo``/``-o lo``,
comments; targets ACCEPT, DROP, REJECT (as a drop), LOG/NFLOG (not carried: Stockade records
flows itself), RETURN and jumps. FORWARD and the other tables are routed or translated traffic,
not the host's own: reported as out of scope. Anything else (MARK, string, limit, recent, owner,
interfaces other than loopback, source ports...) is named in the report and leaves the host in
visibility mode. A line that cannot be read is reported with its file and line; the rest is read.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from stockade.codec.syntax import ICMP_TYPE_NAMES, BadValue, parse_network
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
from stockade.importers.ipset import IPSet, looks_like_ipset, parse_ipset
from stockade.importers.report import Finding, ImportResult, Origin, Outcome
from stockade.importers.source import ImportOptions, Source
from stockade.importers.translate import translate
from stockade.model.addresses import AddressRanges, Family
from stockade.model.services import Proto, ServiceEntry

BASE = {"INPUT": Direction.INBOUND, "OUTPUT": Direction.OUTBOUND}
NON_TERMINATING = {"MARK", "CONNMARK", "CLASSIFY", "TCPMSS", "CT", "NOTRACK", "SET", "AUDIT", "TRACE", "DSCP",
                   "TOS", "SECMARK", "CONNSECMARK", "NFQUEUE", "CHECKSUM"}
LOGGING = {"LOG", "NFLOG", "ULOG"}
TERMINATING = {"TARPIT", "SYNPROXY", "DELUDE", "CHAOS", "QUEUE"}  # block or divert: kept as drops (narrower)
IGNORED_MODULES = {"tcp", "udp", "icmp", "icmp6", "icmpv6", "ipv6-icmp", "comment", "multiport", "conntrack",
                   "state", "set"}
LOOPBACK = "loopback is always allowed by the failsafe"
ESTABLISHED = "established/related traffic is always allowed by the failsafe"
INVALID = ("Stockade does not match conntrack INVALID: such packets meet the rules like new ones "
           "(connection-level policy unchanged)")
ANY_V4 = AddressRanges.of([parse_network("0.0.0.0/0")])
ANY_V6 = AddressRanges.of([parse_network("::/0")])
PROTOS = {"tcp": Proto.TCP, "6": Proto.TCP, "udp": Proto.UDP, "17": Proto.UDP, "icmp": Proto.ICMP, "1": Proto.ICMP,
          "ipv6-icmp": Proto.ICMPV6, "icmpv6": Proto.ICMPV6, "58": Proto.ICMPV6, "all": Proto.ANY, "0": Proto.ANY}


@dataclass
class Line:
    """One ``-A`` line split into its options (``!`` folded into the option's ``neg`` flag)."""

    chain: str
    options: list[tuple[str, list[str], bool]]
    origin: Origin
    text: str


@dataclass
class Table:
    """The filter table of one file."""

    family: Family
    policies: dict[str, str] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    chain_origin: dict[str, Origin] = field(default_factory=dict)


def _family_of(source: Source) -> Family:
    head = source.text[:400]
    if "ip6tables" in head:
        return Family.V6
    if "iptables" in head:
        return Family.V4
    return Family.V6 if "ip6" in source.name or "v6" in source.name else Family.V4


def _split_options(words: list[str]) -> list[tuple[str, list[str], bool]]:
    out: list[tuple[str, list[str], bool]] = []
    neg = False
    i = 0
    while i < len(words):
        w = words[i]
        if w == "!":
            if out and not neg and i + 1 < len(words) and not words[i + 1].startswith("-"):
                neg = True  # old style: -s ! 10.0.0.1
            else:
                neg = True
            i += 1
            continue
        if not w.startswith("-"):
            raise BadValue(f"unexpected word {w!r}")
        args: list[str] = []
        i += 1
        while i < len(words) and not words[i].startswith("-") and words[i] != "!":
            args.append(words[i])
            i += 1
        out.append((w, args, neg))
        neg = False
    return out


def parse_save(source: Source, host: str, findings: list[Finding]) -> Table:
    """The filter table of an ``iptables-save`` file; bad lines reported, never raised."""
    table = Table(_family_of(source))
    current = ""
    skipped: dict[str, tuple[Origin, int]] = {}
    for n, raw in enumerate(source.text.splitlines(), 1):
        text = raw.strip()
        origin = Origin(source.name, n)
        if not text or text.startswith("#"):
            continue
        if text.startswith("*"):
            current = text[1:]
            continue
        if text == "COMMIT":
            current = ""
            continue
        if current != "filter":
            if current and text.startswith("-A"):
                first, count = skipped.get(current, (origin, 0))
                skipped[current] = (first, count + 1)
            elif not current:
                findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80],
                                        "outside a *table ... COMMIT block"))
            continue
        if text.startswith(":"):
            parts = text[1:].split()
            if len(parts) < 2:
                findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80], "a chain line needs a policy"))
                continue
            table.policies[parts[0]] = parts[1]
            table.chain_origin[parts[0]] = origin
            continue
        try:
            words = shlex.split(text)
            if len(words) < 2 or words[0] not in ("-A", "--append"):
                raise BadValue("expected `-A CHAIN ...`")
            options = _split_options(words[2:])
        except (ValueError, BadValue) as exc:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80], str(exc)))
            continue
        table.lines.append(Line(words[1], options, origin, text))
    for name, (origin, count) in sorted(skipped.items()):
        findings.append(Finding(Outcome.OUT_OF_SCOPE, origin, host, f"table {name} ({count} rules)",
                                "only the filter table is imported (NAT and packet mangling stay with their owner)"))
    forward = [ln for ln in table.lines if ln.chain == "FORWARD"]
    if forward:
        findings.append(Finding(Outcome.OUT_OF_SCOPE, forward[0].origin, host, f"FORWARD ({len(forward)} rules)",
                                "routed and container traffic is not the host's own: left to Docker/kube-proxy/"
                                "the router; Stockade never touches these chains"))
    return table


class _RuleBuilder:
    """One line -> a RawRule, for one direction (which end is the peer) and family."""

    def __init__(self, direction: Direction, family: Family, sets: dict[str, IPSet], chains: set[str]) -> None:
        self.direction = direction
        self.family = family
        self.sets = sets
        self.chains = chains

    def _addresses(self, args: list[str], neg: bool) -> AddressRanges:
        nets = [parse_network(a) for arg in args for a in arg.split(",")]
        if any(n.version != self.family.value for n in nets):
            raise BadValue(f"an IPv{nets[0].version} address in an IPv{self.family.value} ruleset")
        ranges = AddressRanges.of(nets)
        if neg:
            return (ANY_V4 if self.family is Family.V4 else ANY_V6).minus(ranges)
        return ranges

    def build(self, line: Line) -> RawRule:
        peer: AddressRanges | None = None
        local: AddressRanges | None = None
        peer_names: tuple[str, ...] = ()
        proto = Proto.ANY
        ports: list[tuple[int, int]] = []
        icmp: int | None = None
        inexpressible: list[str] = []
        kind, target, note = Kind.NOOP, "", ""
        loopback = False
        failsafe = ""
        incoming = self.direction is Direction.INBOUND
        for opt, args, neg in line.options:
            value = args[0] if args else ""
            if opt in ("-s", "--source", "-d", "--destination"):
                is_src = opt in ("-s", "--source")
                ranges = self._addresses(args, neg)
                if is_src == incoming:
                    peer = ranges
                else:
                    local = ranges
            elif opt in ("-p", "--protocol"):
                if neg or value.lower() not in PROTOS:
                    inexpressible.append(f"protocol {'! ' if neg else ''}{value}")
                else:
                    proto = PROTOS[value.lower()]
            elif opt in ("-i", "--in-interface", "-o", "--out-interface"):
                if value == "lo" and not neg:
                    loopback = True
                elif value == "lo" and neg:
                    pass  # the failsafe accepts loopback before any rule: "not lo" is what rules see anyway
                else:
                    inexpressible.append(f"interface {'! ' if neg else ''}{opt} {value}")
            elif opt == "-m":
                if value not in IGNORED_MODULES:
                    inexpressible.append(f"-m {value}")
            elif opt in ("--dport", "--destination-port", "--dports", "--destination-ports"):
                if neg:
                    inexpressible.append(f"! {opt} {value}")
                    continue
                for part in value.split(","):
                    lo, _, hi = part.partition(":")
                    first, last = int(lo or 0), int(hi or lo) if hi or lo else 65535
                    if not 0 <= first <= last <= 65535:
                        raise BadValue(f"bad port {part!r}")
                    ports.append((max(first, 1), last))
            elif opt in ("--sport", "--source-port", "--sports", "--source-ports", "--ports"):
                inexpressible.append(f"{opt} {value} (source ports)")
            elif opt in ("--icmp-type", "--icmpv6-type"):
                name = value.split("/")[0]
                iproto = Proto.ICMP if self.family is Family.V4 else Proto.ICMPV6
                if neg or "/" in value:
                    inexpressible.append(f"{opt} {'! ' if neg else ''}{value}")
                elif name == "any":
                    icmp = None
                elif name.isdigit():
                    icmp = int(name)
                elif name in ICMP_TYPE_NAMES[iproto]:
                    icmp = ICMP_TYPE_NAMES[iproto][name]
                else:
                    inexpressible.append(f"{opt} {value} (an ICMP code, not a type)")
            elif opt in ("--ctstate", "--state"):
                states = set(value.upper().split(","))
                if not neg and states <= {"ESTABLISHED", "RELATED"}:
                    failsafe = "established/related"
                elif not neg and states == {"INVALID"}:
                    failsafe = "invalid"
                elif not neg and "NEW" in states and states <= {"NEW", "ESTABLISHED", "RELATED"}:
                    pass  # new connections are what Stockade's rules judge; the rest is the failsafe's
                else:
                    inexpressible.append(f"{opt} {'! ' if neg else ''}{value}")
            elif opt == "--match-set":
                name = value
                where = args[1] if len(args) > 1 else ""
                ipset = self.sets.get(name)
                if ipset is None:
                    raise BadValue(f"no ipset named {name!r} (pass its `ipset save` file too)")
                if not ipset.usable or where not in ("src", "dst"):
                    inexpressible.append(f"--match-set {name} {where} ({ipset.kind})")
                    continue
                ranges = ipset.ranges() if ipset.family is self.family else AddressRanges()
                if neg:
                    ranges = (ANY_V4 if self.family is Family.V4 else ANY_V6).minus(ranges)
                if (where == "src") == incoming:
                    peer = ranges if peer is None else peer.minus(peer.minus(ranges))
                    peer_names = () if neg else (name,)
                else:
                    local = ranges if local is None else local.minus(local.minus(ranges))
            elif opt in ("--comment",):
                continue
            elif opt in ("-j", "--jump", "-g", "--goto"):
                kind, target, note = self._target(value, opt in ("-g", "--goto"), inexpressible, args)
            elif opt in ("--reject-with", "--log-prefix", "--log-level", "--log-uid", "--log-tcp-options",
                         "--log-ip-options", "--log-tcp-sequence", "--nflog-group", "--nflog-prefix",
                         "--nflog-threshold", "--nflog-range", "--nflog-size", "--set-mark", "--set-xmark",
                         "--syn", "--tcp-flags"):
                if opt in ("--syn", "--tcp-flags") and kind is Kind.NOOP:
                    inexpressible.append(opt)
                continue
            else:
                inexpressible.append(f"{opt} {' '.join(args)}".strip())
        if icmp is not None and proto is Proto.ANY:
            proto = Proto.ICMP if self.family is Family.V4 else Proto.ICMPV6
        if proto is Proto.ICMP and self.family is Family.V6:
            proto = Proto.ICMPV6
        entries: tuple[ServiceEntry, ...]
        if proto is Proto.ANY:
            entries = ANY_ENTRIES
        elif proto.has_ports and ports:
            entries = tuple(sorted({ServiceEntry(proto, a, b) for a, b in ports}))
        elif proto.is_icmp and icmp is not None:
            entries = (ServiceEntry(proto, icmp, icmp),)
        else:
            entries = (ServiceEntry(proto),)
        if ports and not proto.has_ports:
            raise BadValue("ports need -p tcp or -p udp")
        text = line.text
        match = Match(self.family, peer, local, entries, peer_names)
        if loopback and kind is Kind.ACCEPT and not inexpressible:
            return RawRule(Kind.NOOP, match, line.origin, text, note=LOOPBACK, note_outcome=Outcome.CARRIED)
        if loopback:
            inexpressible.append("loopback interface (the failsafe always allows loopback)")
        if failsafe == "established/related":
            if kind is Kind.ACCEPT and not inexpressible:
                return RawRule(Kind.NOOP, match, line.origin, text, note=ESTABLISHED, note_outcome=Outcome.CARRIED)
            inexpressible.append("conntrack state ESTABLISHED/RELATED (always allowed by the failsafe)")
        if failsafe == "invalid":
            if kind is Kind.DROP and not inexpressible:
                return RawRule(Kind.NOOP, match, line.origin, text, note=INVALID)
            inexpressible.append("conntrack state INVALID")
        uncond = not any(o not in ("-j", "--jump", "-g", "--goto") for o, _, _ in line.options)
        return RawRule(kind, match, line.origin, text, target, tuple(inexpressible), uncond, note)

    def _target(self, name: str, goto: bool, inexpressible: list[str], args: list[str]) -> tuple[Kind, str, str]:
        if name == "ACCEPT":
            return Kind.ACCEPT, "", ""
        if name == "DROP":
            return Kind.DROP, "", ""
        if name == "REJECT":
            return Kind.DROP, "", "REJECT becomes a drop (the peer sees a timeout, not a refusal)"
        if name == "RETURN":
            return Kind.RETURN, "", ""
        if name in LOGGING:
            return Kind.NOOP, "", f"{name} is not carried (Stockade records every first packet's verdict itself)"
        if name in self.chains:
            return (Kind.GOTO if goto else Kind.JUMP), name, ""
        if name in NON_TERMINATING:
            inexpressible.append(f"target {name}")
            return Kind.NOOP, "", ""
        if name in TERMINATING:
            inexpressible.append(f"target {name}")
            return Kind.DROP, "", ""
        raise BadValue(f"no chain or target named {name!r}")


def _host_rules(host: str, tables: Sequence[Table], sets: dict[str, IPSet], findings: list[Finding]) -> HostRules:
    chains_out: list[BaseChain] = []
    visibility = False
    all_findings = list(findings)
    for table in tables:
        names = set(table.policies)
        for base, direction in BASE.items():
            builder = _RuleBuilder(direction, table.family, sets, names)
            raw: dict[str, list[RawRule]] = {name: [] for name in names}
            for line in table.lines:
                if line.chain not in names:
                    if direction is Direction.INBOUND:
                        all_findings.append(Finding(Outcome.BAD_INPUT, line.origin, host, line.text[:80],
                                                    f"chain {line.chain!r} is not declared (`:{line.chain} - [0:0]`)"))
                    continue
                try:
                    rule = builder.build(line)
                except (BadValue, ValueError) as exc:
                    if direction is Direction.INBOUND:  # report a bad line once, not per direction
                        all_findings.append(Finding(Outcome.BAD_INPUT, line.origin, host, line.text[:80], str(exc)))
                    continue
                raw[line.chain].append(rule)
            if base not in table.policies and base not in raw:
                continue
            flat = Flattener(raw, host)
            policy = table.policies.get(base, "ACCEPT")
            rules = flat.flatten(base, Match(table.family))
            all_findings.extend(flat.findings)
            visibility = visibility or flat.visibility
            if policy not in ("ACCEPT", "DROP"):
                all_findings.append(Finding(Outcome.BAD_INPUT, table.chain_origin.get(base, Origin("")), host,
                                            f"{base} policy {policy}", "a base chain's policy is ACCEPT or DROP; "
                                            "read as DROP"))
            default = Verdict.ACCEPT if policy == "ACCEPT" else Verdict.DROP
            chains_out.append(BaseChain(direction, table.family, default, tuple(rules),
                                        table.chain_origin.get(base, Origin("")), tuple(flat.left_out)))
    families = tuple(sorted({t.family for t in tables}))
    return HostRules(host, tuple(chains_out), tuple(_dedupe(all_findings)), visibility, families)


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[Finding] = set()
    out = []
    for f in findings:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def import_iptables(sources: Sequence[Source], options: ImportOptions) -> ImportResult:
    """Every host's files (iptables-save, ip6tables-save, ipset save) as one Stockade policy."""
    return translate(iptables_host_rules(sources, options), options.addresses, backend=options.backend)


def iptables_host_rules(sources: Sequence[Source], options: ImportOptions) -> list[HostRules]:
    """Each host's flattened first-match chains (what the import translates and verify samples)."""
    hosts: list[HostRules] = []
    for host, files in options.by_host(sources):
        findings: list[Finding] = []
        sets: dict[str, IPSet] = {}
        tables: list[Table] = []
        for s in files:
            if looks_like_ipset(s.text):
                found, bad = parse_ipset(s, host)
                sets.update(found)
                findings += bad
        for s in files:
            if not looks_like_ipset(s.text):
                tables.append(parse_save(s, host, findings))
        hosts.append(_host_rules(host, tables, sets, findings))
    return hosts
