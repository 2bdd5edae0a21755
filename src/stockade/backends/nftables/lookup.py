"""The lookup layout's port dispatch: one verdict map per direction and tier, keyed by port.

A precedence tier (override-deny, allow, deny) of one direction is entered by ONE lookup::

    meta l4proto . th dport vmap @in_allow

The map (``type inet_proto . inet_service : verdict; flags interval``) jumps to the chain of
the tier's *port group* holding the packet's port: :func:`port_groups` cuts each protocol's
port axis by the bounds of every TCP/UDP rule of the tier, so a group is a port interval and
the rules covering all of it, in precedence order. The group chain tests only those rules'
peer sets (``ip saddr @<peer>_v4_host goto <rule chain>``, v4/v6 x host/net) and returns to
the tier when none matches; the rule chain logs with the rule's id and decides. A packet
therefore walks the rules of its own port, not the policy: flat in the number of rules as
long as rules are spread over ports (the usual case; rules piling on one port are walked).

Why ports and not addresses in the key: a map keyed by ``ip saddr . meta l4proto . th
dport`` (measured first, see ``render.py``) decides in one lookup whatever the rules, but its
elements are the peer addresses times the port groups using them, and on this kernel a
pipapo (concatenated interval) set rebuilds itself in every transaction: a one-peer delta
took 221 ms at 20k elements and 2.2 s at 200k (apply 8 s), against 0.03 ms for a peer-set
delta. Keyed by port, the map changes only with the rules (a reload), the peer sets are the
same named sets as before and a peer delta stays one set-element change.

Only TCP and UDP are dispatched (``any`` contributes its TCP/UDP part); ICMP and any-protocol
rules keep list lines after their tier's lookup. The UDP log-once lines of the verdict chains
(:func:`udp_log_once`) live here too.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from stockade.backends.common import service_groups
from stockade.compiler.ir import Direction, HostRule
from stockade.errors import RenderError
from stockade.model.addresses import Family, Range
from stockade.model.rules import Action
from stockade.model.services import Proto

PORT_PROTOS: dict[Proto, int] = {Proto.TCP: 6, Proto.UDP: 17}
PROTO_NAMES = {6: "tcp", 17: "udp"}
TIER_NAMES = {Action.OVERRIDE_DENY: "override", Action.ALLOW: "allow", Action.DENY: "deny"}


class MapElement(NamedTuple):
    """One dispatch-map element: protocol number, ports lo-hi -> ``jump chain``."""

    proto: int
    port_lo: int
    port_hi: int
    chain: str


@dataclass(frozen=True)
class PortGroup:
    """A port interval of one protocol and the tier's rules covering all of it, in order."""

    proto: int
    port_lo: int
    port_hi: int
    rules: tuple[tuple[str, str], ...]  # (peer set name, verdict chain), first match first


@dataclass(frozen=True)
class TierMap:
    """The dispatch map of one direction and tier; group ``i`` has the chain ``<name>_<i>``."""

    name: str
    direction: Direction
    groups: tuple[PortGroup, ...]

    def group_chain(self, i: int) -> str:
        return f"{self.name}_{i}"

    @property
    def elements(self) -> tuple[MapElement, ...]:
        return tuple(MapElement(g.proto, g.port_lo, g.port_hi, self.group_chain(i)) for i, g in enumerate(self.groups))


def rule_chain(rule: HostRule) -> str:
    """The verdict chain of ``rule``: ``in_<hash>`` / ``out_<hash>`` of its rule id."""
    digest = hashlib.sha256(rule.rule_id.encode()).hexdigest()[:16]
    return f"{'in' if rule.direction is Direction.INBOUND else 'out'}_{digest}"


def map_name(direction: Direction, action: Action) -> str:
    return f"{'in' if direction is Direction.INBOUND else 'out'}_{TIER_NAMES[action]}"


def port_parts(rule: HostRule, family: Family) -> dict[int, tuple[Range, ...]]:
    """The TCP/UDP ports ``rule`` matches, per protocol number (``any``: every port of both)."""
    groups = service_groups(rule.services, family)
    if groups is None:
        return {n: ((0, 65535),) for n in PORT_PROTOS.values()}
    return {PORT_PROTOS[g.proto]: g.ranges or ((0, 65535),) for g in groups if g.proto.has_ports}


def port_groups(rules: Iterable[HostRule], family: Family) -> tuple[PortGroup, ...]:
    """Cut each protocol's port axis by the bounds of ``rules`` (in precedence order)."""
    per_rule = [((r.peer, rule_chain(r)), port_parts(r, family)) for r in rules]
    out: list[PortGroup] = []
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


def map_text(tmap: TierMap) -> str:
    lines = [f"\tmap {tmap.name} {{", "\t\ttype inet_proto . inet_service : verdict", "\t\tflags interval"]
    if tmap.groups:
        lines.append("\t\telements = {")
        lines.append(",\n".join(f"\t\t\t{element_text(e)}" for e in tmap.elements))
        lines.append("\t\t}")
    lines.append("\t}")
    return "\n".join(lines)


def element_text(e: MapElement) -> str:
    port = str(e.port_lo) if e.port_lo == e.port_hi else f"{e.port_lo}-{e.port_hi}"
    return f"{PROTO_NAMES[e.proto]} . {port} : jump {e.chain}"


def lookup_rule(tmap: TierMap) -> str:
    """The chain line that looks ``tmap`` up, exactly as ``nft list`` prints it."""
    return f"meta l4proto . th dport vmap @{tmap.name}"


# ---- flow logging once per UDP flow -----------------------------------------------------

FLOWLOG_SETS = ("flowlog_v4", "flowlog_v6")
FLOWLOG_TIMEOUT_S = 30  # nf_conntrack's timeout of an unreplied UDP flow


def flowlog_set_text(name: str) -> str:
    addr = "ipv4_addr" if name.endswith("v4") else "ipv6_addr"
    return "\n".join((
        f"\tset {name} {{",
        f"\t\ttype {addr} . {addr} . inet_service . inet_service",
        "\t\tsize 65536",
        "\t\tflags dynamic,timeout",
        f"\t\ttimeout {FLOWLOG_TIMEOUT_S}s",
        "\t}",
    ))


def udp_log_once(silent: str, comment: str) -> list[str]:
    """Lines before a logging verdict that log a UDP flow once, not every packet of it.

    A one-way UDP flow never leaves conntrack's NEW state, so each of its packets reaches the
    verdict. The first one is logged and its 4-tuple added to ``flowlog_v4``/``_v6`` (dynamic
    sets, 30 s timeout like an unreplied UDP flow); later ones match the set and get the same
    verdict (``silent``) without a log. nft adds the family and protocol dependencies itself
    (and lists the lines without them)."""
    keys = [(f"{ip} saddr . {ip} daddr . udp sport . udp dport", f"flowlog_v{v}") for ip, v in (("ip", 4), ("ip6", 6))]
    return [f"{key} @{name} {silent} {comment}" for key, name in keys] + [
        f"add @{name} {{ {key} }} {comment}" for key, name in keys
    ]


def check_unique_chains(rules: Iterable[HostRule]) -> None:
    seen: dict[str, str] = {}
    for r in rules:
        chain = rule_chain(r)
        if seen.setdefault(chain, r.rule_id) != r.rule_id:
            raise RenderError(f"rules {seen[chain]} and {r.rule_id} hash to the same chain {chain}")
