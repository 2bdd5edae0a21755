"""Pure rendering of a HostPolicy into IPFilter rules (``ipf.conf``/``ipf6.conf``) and pools.

For AIX, Solaris and illumos (IPFilter 4.1 syntax, which IPFilter 5 still reads). The
artifact holds three files:

* ``ippool.conf``: one ``tree`` pool per peer address set and family,
  ``table role = ipf type = tree number = N { a.b.c.d/len; ... };``. An empty pool cannot be
  written in that grammar; the runner creates it with ``ippool -A`` instead. Pools are
  numbered ``slot + index``: two slots (10000+ and 20000+) alternate between applies, so
  the new pools are loaded beside the old ones and the swap is atomic;
* ``ipf.conf`` (IPv4) and ``ipf6.conf`` (IPv6, loaded with ``ipf -6``): every rule has
  ``quick``, so the first match decides, in this order: loopback, ICMPv6 neighbour discovery,
  inbound management ports, outbound controller path, the host rules in precedence order
  (override-deny, allow, deny), then the mode default. Every ``pass`` keeps state (TCP from
  the SYN: ``flags S/SA keep state``), so replies and established flows are accepted by the
  state table before any rule, which is the failsafe's established/related part.

Modes: *full* ends with ``block in/out quick all``; *selective* with ``pass ... all keep
state``; *visibility* turns every block into ``pass log quick ... keep state`` (ipmon reports
it with its rule number: :meth:`IpfilterArtifact.rule_ids` maps ``@0:N`` back to a rule id);
*idle* renders no rules (the runner swaps in an empty set).

Ports: IPFilter 4.1 has ``=``, ``<=``, ``>=`` and the exclusive range ``lo >< hi``, so an
inclusive range ``a-b`` is written ``port a-1 >< b+1`` (``<=``/``>=`` at the ends). ICMP
types are numeric (``icmp-type 8``), one rule per type.

With ``inline_v6`` (IPFilter releases whose pools are IPv4 only) IPv6 peers are written as
one rule per member network instead of a pool; an empty set then has no rule at all.
Everything interpolated is an int, an IP object, a fixed keyword or a validated name; rule
ids only appear in ``#`` comments after validation.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from stockade.backends.common import ND_TYPES, PORT_MAX, checked_rule_id, controller_port, safe_text, service_groups
from stockade.compiler.ir import Direction, HostPolicy, HostRule
from stockade.errors import RenderError
from stockade.model.addresses import AddressRanges, Family, IPNetwork
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

BACKEND_NAME = "ipfilter"
MAX_POOLS = 10000
_IFACE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:]{0,31}$")


class Slot(Enum):
    """Pool number base: applies alternate between the two."""

    A = 10000
    B = 20000

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A


class IpfAction(Enum):
    PASS = "pass"
    BLOCK = "block"


class PeerKind(Enum):
    ANY = "any"
    POOL = "pool"
    NET = "net"


@dataclass(frozen=True)
class IpfPeer:
    kind: PeerKind
    pool: int = 0  # POOL: index into IpfilterArtifact.pools
    net: IPNetwork | None = None  # NET


ANY_PEER = IpfPeer(PeerKind.ANY)


@dataclass(frozen=True)
class IpfRule:
    """One ipf rule line (always ``quick``)."""

    action: IpfAction
    direction: Direction
    rule_id: str
    proto: str | None = None  # "tcp", "udp", "icmp", "ipv6-icmp"; None: every protocol
    peer: IpfPeer = ANY_PEER  # the source of an inbound rule, the destination of an outbound one
    port: tuple[int, int] | None = None  # destination port range (TCP/UDP)
    icmp_type: int | None = None
    log: bool = False
    keep_state: bool = False
    interface: str | None = None
    everything: bool = False  # "all" (no from/to)


@dataclass(frozen=True)
class IpfPool:
    index: int
    set_name: str
    family: Family
    members: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class IpfilterArtifact:
    workload: str
    mode: EnforcementMode
    present: bool
    pools: tuple[IpfPool, ...]
    rules_v4: tuple[IpfRule, ...]
    rules_v6: tuple[IpfRule, ...]
    host_policy: HostPolicy

    def rules(self, family: Family) -> tuple[IpfRule, ...]:
        return self.rules_v4 if family is Family.V4 else self.rules_v6

    def pool(self, set_name: str, family: Family) -> IpfPool:
        for p in self.pools:
            if p.set_name == set_name and p.family is family:
                return p
        raise KeyError((set_name, family))

    def pool_numbers(self, slot: Slot) -> tuple[int, ...]:
        return tuple(slot.value + p.index for p in self.pools)

    def ippool_conf(self, slot: Slot = Slot.A) -> str:
        out = [f"# Stockade ippool.conf: workload {safe_text(self.workload)} (slot {slot.name.lower()})"]
        for p in self.pools:
            number = slot.value + p.index
            if p.members:
                elems = "; ".join(_net(m) for m in p.members)
                out.append(f"table role = ipf type = tree number = {number}\n\t{{ {elems}; }};")
            else:
                out.append(f"# pool {number} ({p.set_name} v{p.family.value}) is empty: created by ippool -A")
        return "\n".join(out) + "\n"

    def ipf_conf(self, family: Family, slot: Slot = Slot.A) -> str:
        name = "ipf.conf" if family is Family.V4 else "ipf6.conf"
        out = [f"# Stockade {name}: workload {safe_text(self.workload)}, mode {self.mode.value}"]
        out.extend(rule_line(r, slot) for r in self.rules(family))
        return "\n".join(out) + "\n"

    def to_text(self, slot: Slot = Slot.A) -> str:
        return "\n".join(
            [
                "# ---- ippool.conf (ippool -f) ----",
                self.ippool_conf(slot),
                "# ---- ipf.conf (ipf -I -f) ----",
                self.ipf_conf(Family.V4, slot),
                "# ---- ipf6.conf (ipf -6 -I -f) ----",
                self.ipf_conf(Family.V6, slot),
            ]
        )

    def rule_ids(self, family: Family, direction: Direction) -> tuple[str, ...]:
        """Rule ids by ipf rule number (index 0 is rule 1): ``ipmon``'s ``@0:N`` -> rule id."""
        return tuple(r.rule_id for r in self.rules(family) if r.direction is direction)


# ---- text -----------------------------------------------------------------------------




def _net(net: IPNetwork) -> str:
    return f"{net.network_address}/{net.prefixlen}"


def port_text(first: int, last: int) -> str:
    """An inclusive port range in IPFilter 4.1 syntax ("" for every port)."""
    if first == 0 and last == PORT_MAX:
        return ""
    if first == last:
        return f"port = {first}"
    if first == 0:
        return f"port <= {last}"
    if last == PORT_MAX:
        return f"port >= {first}"
    return f"port {first - 1} >< {last + 1}"


def rule_line(rule: IpfRule, slot: Slot = Slot.A) -> str:
    parts = [rule.action.value, "in" if rule.direction is Direction.INBOUND else "out"]
    if rule.log:
        parts.append("log")
    parts.append("quick")
    if rule.interface:
        parts += ["on", rule.interface]
    if rule.proto:
        parts += ["proto", rule.proto]
    if rule.everything:
        parts.append("all")
    else:
        if rule.peer.kind is PeerKind.POOL:
            peer = f"pool/{slot.value + rule.peer.pool}"
        elif rule.peer.kind is PeerKind.NET and rule.peer.net is not None:
            peer = _net(rule.peer.net)
        else:
            peer = "any"
        src, dst = (peer, "any") if rule.direction is Direction.INBOUND else ("any", peer)
        parts += ["from", src, "to", dst]
        if rule.port is not None and (text := port_text(*rule.port)):
            parts.append(text)
        if rule.icmp_type is not None:
            parts += ["icmp-type", str(rule.icmp_type)]
    if rule.keep_state:
        parts += ["flags", "S/SA", "keep", "state"] if rule.proto == "tcp" else ["keep", "state"]
    return " ".join(parts) + f" # {rule.rule_id}"


# ---- rendering ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    proto: str | None
    port: tuple[int, int] | None
    icmp_type: int | None


def service_matches(entries: Iterable[ServiceEntry], family: Family) -> list[_Match]:
    """One match per ipf rule that together cover ``entries`` in ``family``."""
    groups = service_groups(entries, family)
    if groups is None:
        return [_Match(None, None, None)]
    out: list[_Match] = []
    for g in groups:
        name = "ipv6-icmp" if g.proto is Proto.ICMPV6 else g.proto.value
        if g.ranges is None:
            out.append(_Match(name, None, None))
        elif g.proto.is_icmp:
            out.extend(_Match(name, None, t) for t in g.values)
        else:
            out.extend(_Match(name, r, None) for r in g.ranges)
    return out


def _rule_id(rule_id: str) -> str:
    return checked_rule_id(rule_id, "written in an ipf comment")


class _Builder:
    def __init__(self, hp: HostPolicy, loopback: str, inline_v6: bool) -> None:
        self.hp = hp
        self.loopback = loopback
        self.inline_v6 = inline_v6
        self.pools: dict[tuple[str, Family], IpfPool] = {}

    def peers(self, set_name: str, family: Family) -> list[IpfPeer]:
        try:
            members = self.hp.set(set_name, family).members
        except KeyError as exc:
            raise RenderError(f"address set {set_name} ({family.name}) is missing from the host policy") from exc
        if family is Family.V6 and self.inline_v6:
            return [IpfPeer(PeerKind.NET, net=m) for m in members]
        key = (set_name, family)
        if key not in self.pools:
            if len(self.pools) >= MAX_POOLS:
                raise RenderError(f"more than {MAX_POOLS} pools")
            self.pools[key] = IpfPool(len(self.pools), set_name, family, members)
        return [IpfPeer(PeerKind.POOL, pool=self.pools[key].index)]

    def failsafe(self, family: Family) -> list[IpfRule]:
        fs = self.hp.failsafe
        out = [
            IpfRule(IpfAction.PASS, d, "failsafe:loopback", interface=self.loopback, everything=True)
            for d in (Direction.INBOUND, Direction.OUTBOUND)
        ]
        if family is Family.V6:
            out += [
                IpfRule(IpfAction.PASS, d, "failsafe:nd", "ipv6-icmp", icmp_type=t)
                for d in (Direction.INBOUND, Direction.OUTBOUND)
                for t in ND_TYPES
            ]
        for m in service_matches(fs.management, family) if fs.management else []:
            out.append(IpfRule(IpfAction.PASS, Direction.INBOUND, "failsafe:management", m.proto,
                               port=m.port, icmp_type=m.icmp_type, keep_state=True))  # fmt: skip
        if fs.controller:
            port = controller_port(fs.controller_port)
            for net in AddressRanges.of(fs.controller).networks(family):
                out.append(IpfRule(IpfAction.PASS, Direction.OUTBOUND, "failsafe:controller", "tcp",
                                   IpfPeer(PeerKind.NET, net=net), (port, port), keep_state=True))  # fmt: skip
        return out

    def host_rule(self, rule: HostRule, family: Family, mode: EnforcementMode) -> list[IpfRule]:
        rid = _rule_id(rule.rule_id)
        block = rule.action is not Action.ALLOW
        visible = block and mode is EnforcementMode.VISIBILITY
        action = IpfAction.BLOCK if block and not visible else IpfAction.PASS
        out: list[IpfRule] = []
        for peer in self.peers(rule.peer, family):
            for m in service_matches(rule.services, family):
                out.append(IpfRule(action, rule.direction, rid, m.proto, peer, m.port, m.icmp_type, log=visible,
                                   keep_state=action is IpfAction.PASS))  # fmt: skip
        return out


def _defaults(mode: EnforcementMode) -> list[IpfRule]:
    out = []
    for d in (Direction.INBOUND, Direction.OUTBOUND):
        if mode is EnforcementMode.FULL:
            out.append(IpfRule(IpfAction.BLOCK, d, "default", everything=True))
        elif mode is EnforcementMode.SELECTIVE:
            out.append(IpfRule(IpfAction.PASS, d, "default", keep_state=True, everything=True))
        else:
            out.append(IpfRule(IpfAction.PASS, d, "default", log=True, keep_state=True, everything=True))
    return out


def render_ipfilter(hp: HostPolicy, loopback: str = "lo0", *, inline_v6: bool = False) -> IpfilterArtifact:
    """Render ``hp`` (pure). Capabilities are checked by the backend before this runs."""
    if not _IFACE_RE.match(loopback):
        raise RenderError(f"invalid loopback interface name {loopback!r}")
    if hp.mode is EnforcementMode.IDLE:
        return IpfilterArtifact(hp.workload, hp.mode, False, (), (), (), hp)
    b = _Builder(hp, loopback, inline_v6)
    per_family: dict[Family, list[IpfRule]] = {}
    for family in (Family.V4, Family.V6):
        rules = b.failsafe(family)
        for rule in hp.rules:
            rules += b.host_rule(rule, family, hp.mode)
        rules += _defaults(hp.mode)
        per_family[family] = rules
    pools = tuple(sorted(b.pools.values(), key=lambda p: p.index))
    return IpfilterArtifact(hp.workload, hp.mode, True, pools, tuple(per_family[Family.V4]),
                            tuple(per_family[Family.V6]), hp)  # fmt: skip
