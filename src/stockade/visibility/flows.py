"""Flow summaries and their resolution to workloads, labels and IP lists (pure, no I/O).

A :class:`FlowRecord` is what one host's agent reports about one kind of connection: the
first packets of new connections from ``src`` to ``dst`` on ``proto``/``port`` (for ICMP the
type), the verdict its firewall gave them (as reported: allowed, potentially blocked,
blocked), the rule that decided, how many were seen and when. Both ends of a connection
between two managed workloads report it (``side``: outbound at the source host, inbound at
the destination host); :func:`merge_sides` folds such reports into one :class:`Connection`
per (src, dst, proto, port) whose verdict is the worst reported one (blocked anywhere means
blocked), which is what the application map, suggestions and impact preview work on.

:class:`Resolver` answers, for an address, the workload that owns it (and its labels) or,
for an unmanaged address, the most specific IP list containing it (fewest addresses), else
"internet".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.model.addresses import AddressRanges, IPAddress
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.services import Proto
from stockade.model.workloads import Workload

VERDICT_SEVERITY: dict[Verdict, int] = {Verdict.ALLOWED: 0, Verdict.POTENTIALLY_BLOCKED: 1, Verdict.BLOCKED: 2}


def worst(a: Verdict, b: Verdict) -> Verdict:
    """The more severe verdict: blocked > potentially blocked > allowed."""
    return a if VERDICT_SEVERITY[a] >= VERDICT_SEVERITY[b] else b


def address_key(a: IPAddress) -> tuple[int, int]:
    """Total order over mixed v4/v6 addresses (v4 first)."""
    return a.version, int(a)


@dataclass(frozen=True)
class FlowKey:
    """What identifies a connection kind: source, destination, protocol, destination port.

    ``port`` is the destination port for TCP/UDP, the type for ICMP/ICMPv6, None otherwise.
    """

    src: IPAddress
    dst: IPAddress
    proto: Proto
    port: int | None

    def sort_key(self) -> tuple[tuple[int, int], tuple[int, int], int, int]:
        port = -1 if self.port is None else self.port
        return address_key(self.src), address_key(self.dst), _PROTO_RANK[self.proto], port

    def service_text(self) -> str:
        """``443/tcp``, ``icmp:8``, ``any``."""
        if self.proto is Proto.ANY:
            return "any"
        if self.proto.is_icmp:
            return self.proto.value if self.port is None else f"{self.proto.value}:{self.port}"
        return self.proto.value if self.port is None else f"{self.port}/{self.proto.value}"


_PROTO_RANK = {p: i for i, p in enumerate(Proto)}


@dataclass(frozen=True)
class FlowRecord:
    """One side's summary of the connections with one key over a time span (unix seconds)."""

    key: FlowKey
    side: Direction  # OUTBOUND: reported by the source host; INBOUND: by the destination host
    verdict: Verdict
    rule_id: str
    count: int
    first_seen: float
    last_seen: float
    reporter: str = ""  # the reporting workload (filled in by the controller)


@dataclass(frozen=True)
class Connection:
    """Every report about one flow key merged: the worst verdict, both sides' deciding rules."""

    key: FlowKey
    verdict: Verdict
    count: int  # connections seen (the larger of the two sides' counts)
    first_seen: float
    last_seen: float
    outbound_rule: str | None = None  # as reported by the source host, when it reported
    inbound_rule: str | None = None  # as reported by the destination host


def merge_sides(records: Iterable[FlowRecord]) -> list[Connection]:
    """One :class:`Connection` per flow key, sorted by key.

    The same connection seen by both hosts is counted once: per side the counts add up, and the
    connection count is the larger side's (a drop at the destination still counted at the source).
    """
    acc: dict[FlowKey, _Acc] = {}
    for r in records:
        a = acc.get(r.key)
        if a is None:
            a = acc[r.key] = _Acc(r.verdict, r.first_seen, r.last_seen)
        else:
            a.verdict = worst(a.verdict, r.verdict)
            a.first = min(a.first, r.first_seen)
            a.last = max(a.last, r.last_seen)
        if r.side is Direction.OUTBOUND:
            a.out_count += r.count
            a.out_rule = _rule_of(a.out_rule, a.out_verdict, r)
            a.out_verdict = worst(a.out_verdict, r.verdict) if a.out_verdict else r.verdict
        else:
            a.in_count += r.count
            a.in_rule = _rule_of(a.in_rule, a.in_verdict, r)
            a.in_verdict = worst(a.in_verdict, r.verdict) if a.in_verdict else r.verdict
    out = [
        Connection(k, a.verdict, max(a.out_count, a.in_count), a.first, a.last, a.out_rule, a.in_rule)
        for k, a in acc.items()
    ]
    out.sort(key=lambda c: c.key.sort_key())
    return out


def _rule_of(current: str | None, current_verdict: Verdict | None, r: FlowRecord) -> str:
    """Keep the rule of the most severe report (the one that explains the verdict)."""
    if current is None or current_verdict is None:
        return r.rule_id
    if VERDICT_SEVERITY[r.verdict] > VERDICT_SEVERITY[current_verdict]:
        return r.rule_id
    return current


class _Acc:
    __slots__ = ("first", "in_count", "in_rule", "in_verdict", "last", "out_count", "out_rule", "out_verdict",
                 "verdict")

    def __init__(self, verdict: Verdict, first: float, last: float) -> None:
        self.verdict = verdict
        self.first = first
        self.last = last
        self.out_count = 0
        self.in_count = 0
        self.out_rule: str | None = None
        self.in_rule: str | None = None
        self.out_verdict: Verdict | None = None
        self.in_verdict: Verdict | None = None


# ---- resolution -------------------------------------------------------------------------


class EndpointKind(Enum):
    WORKLOAD = "workload"
    IP_LIST = "ip-list"
    INTERNET = "internet"


INTERNET = "internet"


@dataclass(frozen=True)
class Endpoint:
    """An address resolved against a policy: a workload, else an IP list, else the internet."""

    address: IPAddress | None  # None: a workload known by name only (stored flows of a past address)
    kind: EndpointKind
    name: str  # workload name, IP list name, or "internet"
    labels: frozenset[Label] = frozenset()

    @property
    def workload(self) -> str | None:
        return self.name if self.kind is EndpointKind.WORKLOAD else None


class Resolver:
    """Address -> :class:`Endpoint` for one policy (lookups built once)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.owner: dict[IPAddress, Workload] = {}
        for w in policy.workloads:
            for a in w.addresses:
                self.owner[a] = w
        sized = []
        for ipl in policy.ip_lists:
            ranges = ipl.ranges()
            sized.append((_size(ranges), ipl.name, ranges))
        sized.sort(key=lambda t: (t[0], t[1]))
        self._lists: list[tuple[str, AddressRanges]] = [(n, r) for _s, n, r in sized]
        self._cache: dict[IPAddress, Endpoint] = {}

    def ip_list_of(self, addr: IPAddress) -> str | None:
        """The most specific IP list containing ``addr`` (fewest addresses; then by name)."""
        for name, ranges in self._lists:
            if ranges.contains(addr):
                return name
        return None

    def ip_lists_containing(self, addr: IPAddress) -> list[str]:
        """Every IP list containing ``addr``, most specific first."""
        return [name for name, ranges in self._lists if ranges.contains(addr)]

    def endpoint(self, addr: IPAddress) -> Endpoint:
        found = self._cache.get(addr)
        if found is not None:
            return found
        w = self.owner.get(addr)
        if w is not None:
            found = Endpoint(addr, EndpointKind.WORKLOAD, w.name, w.labels)
        else:
            name = self.ip_list_of(addr)
            found = Endpoint(addr, EndpointKind.IP_LIST, name) if name else Endpoint(addr, EndpointKind.INTERNET,
                                                                                     INTERNET)
        self._cache[addr] = found
        return found


def _size(r: AddressRanges) -> int:
    # v4 addresses are weighed as v4-mapped v6 space would be, so a /0 of either family is huge
    return sum(hi - lo + 1 for lo, hi in r.v4) * (1 << 96) + sum(hi - lo + 1 for lo, hi in r.v6)


def labels_text(labels: Iterable[Label]) -> str:
    """``app=shop,env=prod,role=web`` (sorted by key)."""
    return ",".join(str(lab) for lab in sorted(labels))


def parse_labels_text(text: str) -> frozenset[Label]:
    out = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and key:
            out.add(Label(key, value))
    return frozenset(out)
