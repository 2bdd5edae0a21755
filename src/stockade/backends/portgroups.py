"""Port groups: the TCP/UDP/SCTP port axis of one precedence tier cut into intervals of equal rules.

The netfilter backends evaluate a tier by the packet's destination port first (nftables:
one verdict-map lookup; iptables: a binary search over port-range chains) and then test only
the peer sets of the rules covering that port. :func:`port_groups` computes those intervals:
each protocol's port axis is cut by the bounds of every TCP/UDP rule of the tier, and each
interval keeps the rules covering all of it, in precedence order. Neighbouring intervals with
the same rules are merged. ``any`` protocol contributes its TCP and UDP part (every port; its
SCTP part stays in its list line, which matches every protocol, so policies without SCTP render
as before); ICMP and other protocols are not dispatched by port and stay list lines.

Shared by the nftables and iptables families (pure, no I/O); what a group's rules are keyed
by (a chain name, a peer set) is the caller's ``key``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from stockade.backends.common import service_groups
from stockade.compiler.ir import HostRule
from stockade.model.addresses import Family, Range
from stockade.model.services import Proto

PORT_PROTOS: dict[Proto, int] = {Proto.TCP: 6, Proto.UDP: 17, Proto.SCTP: 132}
PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}
ANY_PORT_PROTOS = (6, 17)  # what ``any`` adds to the dispatch; its SCTP part stays in its list line

K = TypeVar("K")


@dataclass(frozen=True)
class PortGroup(Generic[K]):
    """A port interval of one protocol and the tier's rules covering all of it, in order."""

    proto: int
    port_lo: int
    port_hi: int
    rules: tuple[K, ...]  # the callers' keys of the covering rules, first match first


def port_parts(rule: HostRule, family: Family) -> dict[int, tuple[Range, ...]]:
    """The TCP/UDP/SCTP ports ``rule`` matches, per protocol number (``any``: every TCP and UDP port)."""
    groups = service_groups(rule.services, family)
    if groups is None:
        return {n: ((0, 65535),) for n in ANY_PORT_PROTOS}
    return {PORT_PROTOS[g.proto]: g.ranges or ((0, 65535),) for g in groups if g.proto.has_ports}


def port_groups(rules: Iterable[HostRule], family: Family, key: Callable[[HostRule], K]) -> tuple[PortGroup[K], ...]:
    """Cut each protocol's port axis by the bounds of ``rules`` (in precedence order)."""
    per_rule = [(key(r), port_parts(r, family)) for r in rules]
    out: list[PortGroup[K]] = []
    for proto in sorted(PORT_PROTOS.values()):
        starts: dict[int, list[int]] = {}
        ends: dict[int, list[int]] = {}
        for i, (_, parts) in enumerate(per_rule):
            for lo, hi in parts.get(proto, ()):
                starts.setdefault(lo, []).append(i)
                ends.setdefault(hi + 1, []).append(i)
        active: dict[int, int] = {}
        edges = sorted(set(starts) | set(ends))
        for lo, nxt in itertools.pairwise(edges):
            for i in ends.get(lo, ()):
                active[i] -= 1
                if not active[i]:
                    del active[i]
            for i in starts.get(lo, ()):
                active[i] = active.get(i, 0) + 1
            if not active:
                continue
            covering = tuple(per_rule[i][0] for i in sorted(active))
            if out and out[-1].proto == proto and out[-1].rules == covering and out[-1].port_hi == lo - 1:
                out[-1] = PortGroup(proto, out[-1].port_lo, nxt - 1, covering)
            else:
                out.append(PortGroup(proto, lo, nxt - 1, covering))
    return tuple(out)
