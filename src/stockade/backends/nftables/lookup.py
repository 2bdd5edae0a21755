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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from stockade.backends.portgroups import PROTO_NAMES, PortGroup
from stockade.backends.portgroups import port_groups as shared_port_groups
from stockade.backends.portgroups import port_parts as port_parts  # re-exported for the renderer
from stockade.compiler.ir import Direction, HostRule
from stockade.errors import RenderError
from stockade.model.addresses import Family
from stockade.model.rules import Action

TIER_NAMES = {Action.OVERRIDE_DENY: "override", Action.ALLOW: "allow", Action.DENY: "deny"}


class MapElement(NamedTuple):
    """One dispatch-map element: protocol number, ports lo-hi -> ``jump chain``."""

    proto: int
    port_lo: int
    port_hi: int
    chain: str


@dataclass(frozen=True)
class TierMap:
    """The dispatch map of one direction and tier; group ``i`` has the chain ``<name>_<i>``."""

    name: str
    direction: Direction
    groups: tuple[PortGroup[tuple[str, str]], ...]

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


def port_groups(rules: Iterable[HostRule], family: Family) -> tuple[PortGroup[tuple[str, str]], ...]:
    """The tier's port groups, each rule keyed by (peer set, verdict chain)."""
    return shared_port_groups(rules, family, lambda r: (r.peer, rule_chain(r)))


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
