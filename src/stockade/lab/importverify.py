"""``stockade import --verify``: prove an iptables/nftables import in the kernel lab.

Two labs run at once, each with a ``client`` namespace (every sampled peer address) and a
``subject`` namespace (the host's addresses): in one the *original* ruleset is loaded as the host
had it (``iptables-restore``/``ip6tables-restore`` + ``ipset restore``, or ``nft -j -f``; lines the
import reported as bad input are left out, as the import did), in the other Stockade's compiled
policy for the host, applied by a Linux backend, in the mode its rules were written for. The same
probes then run in both: for every rule of every flattened chain, TCP/UDP/ICMP echo, v4 and v6,
peers sampled at the edges and middle of each address range (and just outside it) and ports at
the edges of each port range, plus each chain's default. A probe is *equal* when it gets through in
both or in neither. The import is never wider: a probe allowed by Stockade but not by the original
is a bug; allowed by the original but not by Stockade is a narrowing the report names.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from stockade.backends.registry import get_backend
from stockade.codec.syntax import non_host_address
from stockade.compiler import compile_host
from stockade.importers import ImportOptions, Outcome, Source, run_import
from stockade.importers.chains import BaseChain, Direction, HostRules, Match
from stockade.importers.ipset import looks_like_ipset
from stockade.importers.iptables import iptables_host_rules
from stockade.importers.nftables import nftables_host_rules
from stockade.lab.lab import HostSpec, Lab
from stockade.lab.netns import LabError
from stockade.lab.probes import Outcome as ProbeOutcome
from stockade.lab.probes import Probe, ProbeKind
from stockade.model.addresses import Family, IPAddress
from stockade.model.services import Proto

DEFAULT_HOST = (ipaddress.ip_address("10.70.250.1"), ipaddress.ip_address("fd70:250::1"))
ANY_PEER = {Family.V4: ipaddress.ip_address("192.0.2.10"), Family.V6: ipaddress.ip_address("2001:db8::10")}
MAX_PROBES = 600
PEERS_PER_RULE = 4


@dataclass(frozen=True)
class ImportProbeRow:
    """One probe and how it fared against the original and against Stockade."""

    probe: Probe
    rule: str  # the sampled rule (file:line or JSON path), or "default"
    original: ProbeOutcome
    stockade: ProbeOutcome

    @property
    def equal(self) -> bool:
        return (self.original is ProbeOutcome.OK) == (self.stockade is ProbeOutcome.OK)

    @property
    def wider(self) -> bool:
        return self.stockade is ProbeOutcome.OK and self.original is not ProbeOutcome.OK


@dataclass(frozen=True)
class ImportProof:
    host: str
    backend: str
    rows: tuple[ImportProbeRow, ...]

    @property
    def different(self) -> tuple[ImportProbeRow, ...]:
        return tuple(r for r in self.rows if not r.equal)

    def text(self) -> str:
        lines = [f"# stockade import --verify: host {self.host}, Stockade on {self.backend}",
                 f"{len(self.rows)} probes: {len(self.rows) - len(self.different)} equal, "
                 f"{len(self.different)} different ({sum(r.wider for r in self.rows)} wider)", ""]
        for r in self.rows:
            verdict = "equal" if r.equal else ("DIFFERENT (Stockade wider)" if r.wider else "different (narrower)")
            lines.append(f"{verdict:28} {r.probe}  original={r.original.value} stockade={r.stockade.value}"
                         f"  [{r.rule}]")
        return "\n".join(lines) + "\n"


def _address(family: Family, value: int) -> IPAddress | None:
    if value < 0 or value >= 1 << family.bits:
        return None
    a = ipaddress.IPv4Address(value) if family is Family.V4 else ipaddress.IPv6Address(value)
    return None if non_host_address(a) else a


def _peers(match: Match) -> list[IPAddress]:
    if match.peer is None:
        return [ANY_PEER[match.family]]
    out: list[IPAddress] = []
    for lo, hi in match.peer.v4 if match.family is Family.V4 else match.peer.v6:
        for v in (lo, hi, (lo + hi) // 2, lo - 1, hi + 1):
            a = _address(match.family, v)
            if a is not None and a not in out:
                out.append(a)
    return out[:PEERS_PER_RULE]


def _services(match: Match) -> list[tuple[ProbeKind, int | None]]:
    out: list[tuple[ProbeKind, int | None]] = []
    for e in match.entries:
        if e.proto is Proto.ANY:
            out += [(ProbeKind.TCP, 80), (ProbeKind.UDP, 53), (ProbeKind.ICMP_ECHO, None)]
        elif e.proto.has_ports:
            kind = {Proto.TCP: ProbeKind.TCP, Proto.UDP: ProbeKind.UDP}.get(e.proto, ProbeKind.SCTP)
            first = e.first if e.first is not None else {ProbeKind.TCP: 80, ProbeKind.UDP: 53}.get(kind, 3868)
            last = e.last if e.last is not None and e.first is not None else first
            out += [(kind, first), (kind, last)]
        elif e.first is None or e.first in (8, 128):
            out.append((ProbeKind.ICMP_ECHO, None))
    return list(dict.fromkeys(out))[:4]


def sample_probes(host: HostRules, addresses: Sequence[IPAddress]) -> list[tuple[Probe, str]]:
    """Probes across every rule's match space (and each chain's default), deduplicated and capped."""
    found: dict[Probe, str] = {}
    for chain in host.chains:
        own = [a for a in addresses if a.version == chain.family.value]
        if not own:
            continue
        rules = [*((r.match, str(r.origin)) for r in chain.rules), *((m, str(o)) for m, o in chain.left_out)]
        for match, origin in [*rules, *_defaults(chain)]:
            for peer in _peers(match):
                if peer in addresses:
                    continue
                for kind, port in _services(match):
                    inbound = chain.direction is Direction.INBOUND
                    probe = Probe("client" if inbound else "subject", "subject" if inbound else "client", kind,
                                  peer if inbound else own[0], own[0] if inbound else peer, port)
                    found.setdefault(probe, origin)
    return list(found.items())[:MAX_PROBES]


def _defaults(chain: BaseChain) -> Iterable[tuple[Match, str]]:
    yield Match(chain.family), "default"


def _filter_block(text: str, bad_lines: set[int]) -> str:
    """The ``*filter`` table of an iptables-save file without the lines the import could not read."""
    out: list[str] = []
    inside = False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("*"):
            inside = stripped == "*filter"
        if inside and n not in bad_lines:
            out.append(line)
        if stripped == "COMMIT":
            inside = False
    return "\n".join(out) + "\n"


def load_original(lab: Lab, host: str, kind: str, sources: Sequence[Source], bad: set[tuple[str, int, str]]) -> None:
    """The original ruleset as the host had it, in ``host``'s namespace."""
    if kind == "iptables":
        for s in sources:
            if looks_like_ipset(s.text):
                lab.run_in(host, ["ipset", "restore", "-exist"], input=s.text)
        for s in sources:
            if looks_like_ipset(s.text):
                continue
            lines = {line for f, line, _ in bad if f == s.name}
            v6 = "ip6tables" in s.text[:400] or ("ip6" in s.name and "iptables-save" not in s.text[:400])
            lab.run_in(host, ["ip6tables-restore" if v6 else "iptables-restore"], input=_filter_block(s.text, lines))
        return
    for s in sources:
        doc = json.loads(s.text)
        paths = {p for f, _, p in bad if f == s.name}
        doc["nftables"] = [item for i, item in enumerate(doc["nftables"]) if f"/nftables/{i}" not in paths]
        lab.run_in(host, ["nft", "-j", "-f", "-"], input=json.dumps(doc))


def verify_import(kind: str, sources: Sequence[Source], options: ImportOptions, host: str | None = None,
                  backend: str = "nftables", timeout: float = 0.4) -> ImportProof:
    """Load the original and Stockade's policy in two labs, probe both, compare probe by probe."""
    if kind not in ("iptables", "nftables"):
        raise LabError(f"--verify proves Linux rulesets (iptables, nftables), not {kind}")
    rules = (iptables_host_rules if kind == "iptables" else nftables_host_rules)(sources, options)
    names = [h.host for h in rules]
    name = host or (names[0] if len(names) == 1 else "")
    if name not in names:
        raise LabError(f"--verify needs one host (found {', '.join(names) or 'none'}): pass --host")
    host_rules = next(h for h in rules if h.host == name)
    addresses = tuple(options.addresses.get(name) or DEFAULT_HOST)
    options = replace(options, addresses={**options.addresses, name: addresses})
    result = run_import(kind, sources, options)
    bad = {(f.origin.file, f.origin.line, f.origin.path) for f in result.findings if f.outcome is Outcome.BAD_INPUT}
    enforce = dict(result.enforce_modes)[name]
    policy = result.policy.with_workload(replace(result.policy.workload_map()[name], mode=enforce))
    host_policy = compile_host(policy, name)
    sampled = sample_probes(host_rules, addresses)
    probes = [p for p, _ in sampled]
    peers = tuple(dict.fromkeys(a for p in probes for a in (p.src, p.dst) if a not in addresses))
    inbound_ports = [p for p in probes if p.dst_host == "subject"]
    outbound_ports = [p for p in probes if p.dst_host == "client"]

    def spec(name: str, addrs: tuple[IPAddress, ...], served: list[Probe]) -> HostSpec:
        return HostSpec(name, addrs, tuple(sorted({p.port for p in served if p.kind is ProbeKind.TCP and p.port})),
                        tuple(sorted({p.port for p in served if p.kind is ProbeKind.UDP and p.port})),
                        tuple(sorted({p.port for p in served if p.kind is ProbeKind.SCTP and p.port})))

    hosts = [spec("client", peers, outbound_ports), spec("subject", addresses, inbound_ports)]
    # probes run only between the lab's namespaces (no path out), and the sampled peers are real
    # addresses of the estate: no blackhole routes for them in this machine's root namespace
    with Lab(hosts, blackhole=False) as original, Lab(hosts, blackhole=False) as imported:
        load_original(original, "subject", kind, sources, bad)
        b = get_backend(backend, netns=imported.netns("subject"))
        b.apply(b.render(host_policy))
        before = original.probe(probes, timeout=timeout)
        after = imported.probe(probes, timeout=timeout)
    rows = tuple(ImportProbeRow(p, origin, o.outcome, s.outcome)
                 for (p, origin), o, s in zip(sampled, before, after, strict=True))
    return ImportProof(name, backend, rows)
