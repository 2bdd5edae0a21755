"""Symbolic set algebra for backends whose rules have no order (Windows Firewall).

An ordered first-match list (nftables, ipf, F5) expresses "a deny that an allow crosses" by
putting the allow first. Windows Firewall has no order: every block rule beats every allow
rule. A regular deny must therefore be rendered as a block of *deny minus the crossing
allows* (and minus the failsafe, which the evaluator checks before any rule). This module
computes that difference:

* :class:`ServiceSpace` is a set of (protocol, port/type) points: merged inclusive ranges of
  TCP and UDP ports and ICMP / ICMPv6 types, plus ``other`` (every IP protocol beyond these
  four, which only ``Proto.ANY`` covers);
* :func:`split_cells` cuts a space into elementary :class:`ServiceCell` s such that each of a
  set of other spaces either contains a cell whole or misses it;
* :func:`apply_set_deltas` folds set deltas into a host policy (backends that recompute);
* :func:`carve` subtracts a list of :class:`Subtrahend` s (peer set x service space) from
  ``peer x space``. Addresses stay *symbolic*: each resulting :class:`BlockPiece` names its
  peer as a :class:`PeerExpr` (``base`` minus other peer sets, and maybe minus the controller
  networks). The pieces depend only on the rules, never on set members, so peer churn changes
  the addresses behind a :class:`PeerExpr` (a dynamic keyword) and never the rules.
  :meth:`PeerExpr.resolve` gives the concrete addresses.

Everything is pure and deterministic (sorted output).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from stockade.backends.base import Capability, check_delta_capabilities
from stockade.backends.common import PORT_MAX, TYPE_MAX, entry_bounds, limit_of
from stockade.compiler.delta import apply_set_deltas as strict_apply_set_deltas
from stockade.compiler.ir import HostPolicy, SetDelta
from stockade.errors import ApplyError, ConflictError, RenderError
from stockade.model.addresses import AddressRanges, Family, IPNetwork, Range, merge_ranges, subtract_ranges
from stockade.model.services import Proto, ServiceEntry

LAYER4 = (Proto.TCP, Proto.UDP, Proto.ICMP, Proto.ICMPV6)
OTHER = Proto.ANY  # the proto of the cell standing for every other IP protocol
ND_TYPES: tuple[Range, ...] = ((133, 137),)  # ICMPv6 neighbour discovery (RS, RA, NS, NA, redirect)


def _space(ranges: dict[Proto, tuple[Range, ...]], other: bool) -> ServiceSpace:
    return ServiceSpace(ranges[Proto.TCP], ranges[Proto.UDP], ranges[Proto.ICMP], ranges[Proto.ICMPV6], other)


@dataclass(frozen=True)
class ServiceSpace:
    """A set of service points; ``other`` stands for every IP protocol but TCP/UDP/ICMP/ICMPv6."""

    tcp: tuple[Range, ...] = ()
    udp: tuple[Range, ...] = ()
    icmp: tuple[Range, ...] = ()
    icmpv6: tuple[Range, ...] = ()
    other: bool = False

    @staticmethod
    def everything() -> ServiceSpace:
        return ServiceSpace(((0, PORT_MAX),), ((0, PORT_MAX),), ((0, TYPE_MAX),), ((0, TYPE_MAX),), True)

    @staticmethod
    def of(entries: Iterable[ServiceEntry]) -> ServiceSpace:
        found: dict[Proto, list[Range]] = {p: [] for p in LAYER4}
        for e in entries:
            if e.proto is Proto.ANY:
                return ServiceSpace.everything()
            found[e.proto].append(entry_bounds(e))
        return _space({p: merge_ranges(found[p]) for p in LAYER4}, False)

    @staticmethod
    def single(proto: Proto, ranges: Iterable[Range]) -> ServiceSpace:
        parts: dict[Proto, tuple[Range, ...]] = {p: () for p in LAYER4}
        parts[proto] = merge_ranges(ranges)
        return _space(parts, False)

    def ranges(self, proto: Proto) -> tuple[Range, ...]:
        if proto is Proto.TCP:
            return self.tcp
        if proto is Proto.UDP:
            return self.udp
        if proto is Proto.ICMP:
            return self.icmp
        if proto is Proto.ICMPV6:
            return self.icmpv6
        raise ValueError(proto)

    def is_empty(self) -> bool:
        return not (self.tcp or self.udp or self.icmp or self.icmpv6 or self.other)

    def is_everything(self) -> bool:
        return self == ServiceSpace.everything()

    def union(self, other: ServiceSpace) -> ServiceSpace:
        return _space({p: merge_ranges(self.ranges(p) + other.ranges(p)) for p in LAYER4}, self.other or other.other)

    def minus(self, other: ServiceSpace) -> ServiceSpace:
        return _space(
            {p: subtract_ranges(self.ranges(p), other.ranges(p)) for p in LAYER4}, self.other and not other.other
        )

    def contains(self, proto: Proto, value: int | None) -> bool:
        """Does the space hold this probe? ``Proto.ANY`` probes an "other" protocol."""
        if proto is Proto.ANY:
            return self.other
        if value is None:
            return self.ranges(proto) == ((0, limit_of(proto)),)
        return any(lo <= value <= hi for lo, hi in self.ranges(proto))


@dataclass(frozen=True, order=True)
class ServiceCell:
    """An elementary piece of a space: ``proto`` ranges ``first..last``; proto ANY = other protocols."""

    proto: Proto
    first: int
    last: int


def covers(space: ServiceSpace, cell: ServiceCell) -> bool:
    if cell.proto is OTHER:
        return space.other
    return any(lo <= cell.first and cell.last <= hi for lo, hi in space.ranges(cell.proto))


def split_cells(target: ServiceSpace, others: Iterable[ServiceSpace]) -> tuple[ServiceCell, ...]:
    """``target`` cut at every boundary of ``others``: each other space covers a cell or misses it."""
    others = list(others)
    cells: list[ServiceCell] = []
    for proto in LAYER4:
        cuts: set[int] = set()
        for o in others:
            for lo, hi in o.ranges(proto):
                cuts.add(lo)
                cuts.add(hi + 1)
        for lo, hi in target.ranges(proto):
            inner = sorted(c for c in cuts if lo < c <= hi)
            start = lo
            for c in inner:
                cells.append(ServiceCell(proto, start, c - 1))
                start = c
            cells.append(ServiceCell(proto, start, hi))
    if target.other:
        cells.append(ServiceCell(OTHER, 0, 0))
    return tuple(cells)


def space_of_cells(cells: Iterable[ServiceCell]) -> ServiceSpace:
    found: dict[Proto, list[Range]] = {p: [] for p in LAYER4}
    other = False
    for c in cells:
        if c.proto is OTHER:
            other = True
        else:
            found[c.proto].append((c.first, c.last))
    return _space({p: merge_ranges(found[p]) for p in LAYER4}, other)


# ---- symbolic addresses ----------------------------------------------------------------


@dataclass(frozen=True, order=True)
class PeerExpr:
    """Addresses of peer set ``base`` minus the sets in ``minus`` (and the controller networks)."""

    base: str
    minus: tuple[str, ...] = ()
    minus_controller: bool = False

    @property
    def name(self) -> str:
        """A stable identifier: the base set's name, or base + a hash of what is subtracted."""
        if not self.minus and not self.minus_controller:
            return self.base
        text = ",".join(self.minus) + ("|controller" if self.minus_controller else "")
        return f"{self.base}_m{hashlib.sha256(text.encode()).hexdigest()[:10]}"

    def resolve(self, hp: HostPolicy) -> AddressRanges:
        ranges = set_ranges(hp, self.base)
        for name in self.minus:
            ranges = ranges.minus(set_ranges(hp, name))
        if self.minus_controller:
            ranges = ranges.minus(AddressRanges.of(hp.failsafe.controller))
        return ranges

    def networks(self, hp: HostPolicy) -> tuple[IPNetwork, ...]:
        r = self.resolve(hp)
        return r.networks(Family.V4) + r.networks(Family.V6)


def set_ranges(hp: HostPolicy, name: str) -> AddressRanges:
    """Both families of peer set ``name`` as ranges; RenderError when the policy lacks it."""
    members: list[IPNetwork] = []
    for family in (Family.V4, Family.V6):
        try:
            members.extend(hp.set(name, family).members)
        except KeyError as exc:
            raise RenderError(f"address set {name} ({family.name}) is missing from the host policy") from exc
    return AddressRanges.of(members)


class SubtrahendKind(Enum):
    PEER = "peer"  # the addresses of a peer set
    CONTROLLER = "controller"  # the failsafe controller networks
    EVERYWHERE = "everywhere"  # every address (management ports, neighbour discovery)


@dataclass(frozen=True)
class Subtrahend:
    """Traffic taken out of a block: ``kind`` addresses (``peer`` for PEER) on ``space``."""

    kind: SubtrahendKind
    space: ServiceSpace
    peer: str = ""
    why: str = field(default="", compare=False)  # the rule id, for humans


@dataclass(frozen=True)
class BlockPiece:
    """What remains of a block after subtraction: ``peer`` addresses on ``space``."""

    peer: PeerExpr
    space: ServiceSpace


def carve(base_peer: str, space: ServiceSpace, subtrahends: Sequence[Subtrahend]) -> tuple[BlockPiece, ...]:
    """``base_peer x space`` minus every subtrahend, grouped by the symbolic peer left over.

    A cell covered by an EVERYWHERE subtrahend, or by the base peer itself, disappears.
    """
    cells = split_cells(space, (s.space for s in subtrahends))
    groups: dict[PeerExpr, list[ServiceCell]] = {}
    for cell in cells:
        covering = [s for s in subtrahends if covers(s.space, cell)]
        if any(s.kind is SubtrahendKind.EVERYWHERE for s in covering):
            continue
        names = sorted({s.peer for s in covering if s.kind is SubtrahendKind.PEER})
        if base_peer in names:
            continue
        ctrl = any(s.kind is SubtrahendKind.CONTROLLER for s in covering)
        groups.setdefault(PeerExpr(base_peer, tuple(names), ctrl), []).append(cell)
    return tuple(BlockPiece(expr, space_of_cells(cs)) for expr, cs in sorted(groups.items()))


# ---- set deltas ------------------------------------------------------------------------


def apply_set_deltas(hp: HostPolicy, deltas: Sequence[SetDelta]) -> HostPolicy:
    """``hp`` with set members changed by ``deltas``: the one strict apply
    (:func:`stockade.compiler.delta.apply_set_deltas`), its refusal raised as the
    :class:`ApplyError` a backend's ``apply_delta`` raises (the previous policy stays in force)."""
    try:
        return strict_apply_set_deltas(hp, deltas)
    except ConflictError as exc:
        raise ApplyError(str(exc)) from exc


def policy_after_deltas(backend: str, capabilities: frozenset[Capability], applied: HostPolicy | None,
                        deltas: tuple[SetDelta, ...]) -> HostPolicy | None:
    """The start of ``apply_delta`` for a backend that recomputes from the host policy (no native
    sets): ``deltas`` checked against its capabilities (fail closed), then the policy it last
    applied (``applied``) with them applied; None when there is nothing to do. Refused
    (:class:`ApplyError`) before a full policy was applied."""
    check_delta_capabilities(backend, capabilities, deltas)
    if not deltas:
        return None
    if applied is None:
        raise ApplyError("no policy applied by this backend yet: apply a full policy first")
    return apply_set_deltas(applied, deltas)
