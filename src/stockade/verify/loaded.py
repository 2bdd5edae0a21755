"""What the kernel holds, as read back: one small, backend-neutral IR the prover interprets.

The read-back parsers (:mod:`.nft_readback`, :mod:`.ipt_readback`) turn ``nft -j list table``
and ``iptables-save`` + ``ipset save`` into these frozen values; anything they cannot express
here raises :class:`~stockade.errors.UnmodelledConstructError` instead of being skipped, so a
construct the prover does not understand can never be proven "equal" by omission.

A :class:`FamilyRules` is everything one address family's packets meet: chains (rules are
conjunctions of :data:`Match` values and one :class:`Verdict`), the base chains per hook in
traversal order, address sets (already merged to integer ranges), port dispatch maps and
dynamic sets (whose contents are runtime state and stay unknown to the proof).

Header fields (:class:`Field`) are those the model covers: l4 protocol, source/destination
port, ICMP type, TCP flags, conntrack state and whether the packet is on the loopback
interface. Addresses are matched only through named sets (a literal address or CIDR in a rule
becomes an anonymous set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from stockade.model.addresses import Family, Range


class Field(Enum):
    L4PROTO = "l4proto"
    SPORT = "sport"
    DPORT = "dport"
    ICMP_TYPE = "icmp-type"


class Addr(Enum):
    """Which address of the packet a match reads."""

    SADDR = "saddr"
    DADDR = "daddr"


class HookName(Enum):
    INPUT = "input"
    OUTPUT = "output"
    POSTROUTING = "postrouting"  # only as a Tunnel match's side: chains at it count as OUTPUT


CT_STATES = ("new", "established", "related", "invalid", "untracked")
TCP_FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20, "ecn": 0x40, "cwr": 0x80}


@dataclass(frozen=True)
class FamilyIs:
    """The packet is of ``family`` (implied by ``ip saddr``, ``ip6 daddr`` ...)."""

    family: Family


@dataclass(frozen=True)
class AddrIn:
    """``addr`` is (or with ``negate`` is not) in the set ``set_name`` of ``family``."""

    addr: Addr
    family: Family
    set_name: str
    negate: bool = False


@dataclass(frozen=True)
class IntIn:
    """A header field lies in (or with ``negate`` outside) ``ranges``."""

    field: Field
    ranges: tuple[Range, ...]
    negate: bool = False


@dataclass(frozen=True)
class TcpFlags:
    """``flags & mask == value`` (or ``!=`` with ``negate``); implies TCP."""

    mask: int
    value: int
    negate: bool = False


@dataclass(frozen=True)
class CtState:
    """conntrack state is one of ``states`` (or none of them with ``negate``)."""

    states: frozenset[str]
    negate: bool = False


@dataclass(frozen=True)
class Loopback:
    """The packet's input (``side`` INPUT) or output interface is ``lo`` (or not); a packet at
    the input hook has no output interface and vice versa."""

    side: HookName
    negate: bool = False


@dataclass(frozen=True)
class InDynamicSet:
    """A lookup in a set the datapath fills itself (flow logging): membership is unknown."""

    set_name: str


@dataclass(frozen=True)
class Tunnel:
    """The packet's interface is the WireGuard tunnel's (or not, with ``negate``): at ``INPUT`` the
    interface it arrived on; at ``POSTROUTING`` the one it leaves by (after steering re-routed it);
    a test of the output interface at the output hook sees the device routed to before steering:
    never the tunnel (see :mod:`.tunnel`)."""

    side: HookName
    negate: bool = False


@dataclass(frozen=True)
class ConnEncrypted:
    """The packet's connection is marked encrypted (nftables ``ct mark``, iptables ``connmark``,
    eBPF's flow ``enc``), or not with ``negate``."""

    negate: bool = False


@dataclass(frozen=True)
class PacketMark:
    """The packet's mark (``meta mark``, iptables ``-m mark``) is ``value`` (or not): only the
    steering mark and wireguard-go's socket mark are modelled (:mod:`.tunnel`)."""

    value: int
    negate: bool = False


Match = FamilyIs | AddrIn | IntIn | TcpFlags | CtState | Loopback | InDynamicSet | Tunnel | ConnEncrypted | PacketMark


class Kind(Enum):
    CONTINUE = "continue"  # no verdict (log, counter, set add): the next rule runs
    ACCEPT = "accept"
    DROP = "drop"
    RETURN = "return"
    JUMP = "jump"
    GOTO = "goto"
    VMAP = "vmap"  # target: the map's name
    MARK = "mark"  # set the packet's mark to the steering mark, then the next rule (see :mod:`.tunnel`)


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    target: str = ""


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    verdict: Verdict
    comment: str = ""


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...]
    policy: Kind | None = None  # base chains: ACCEPT or DROP


@dataclass(frozen=True)
class MapElement:
    """``l4proto . dport`` in (proto, lo..hi) -> verdict."""

    proto: int
    port_lo: int
    port_hi: int
    verdict: Verdict


@dataclass(frozen=True)
class AddressSet:
    family: Family
    ranges: tuple[Range, ...]


@dataclass(frozen=True)
class FamilyRules:
    """Everything one family's packets meet in the loaded ruleset."""

    family: Family
    chains: dict[str, Chain]
    hooks: dict[HookName, tuple[str, ...]]  # base chains per hook, in traversal order
    sets: dict[str, AddressSet]
    maps: dict[str, tuple[MapElement, ...]] = field(default_factory=dict)
    dynamic_sets: frozenset[str] = frozenset()


class Steering(Enum):
    """What the steering mark does to a packet at the output hook (see :mod:`.tunnel`).

    ``ROUTE`` (nftables, iptables): policy routing sends it into the tunnel when the route is
    there, else by the ordinary route (where a postrouting guard must drop it). The eBPF datapath
    redirects it to ``stk_current``'s interface index: ``TUNNEL`` when that is the WireGuard
    interface running Stockade's tunnel programs (a missing route/interface: the redirect fails,
    dropped), ``CLEAR`` when it is another (Ethernet) interface (sent in the clear), ``NONE``
    when there is no such interface (index 0 or gone: dropped)."""

    ROUTE = "route"
    TUNNEL = "tunnel"
    CLEAR = "clear"
    NONE = "none"


@dataclass(frozen=True)
class LoadedRuleset:
    """One backend's read-back: ``present`` False means nothing of Stockade is loaded."""

    backend: str
    present: bool
    families: tuple[FamilyRules, ...]
    notes: tuple[str, ...] = ()  # assumptions the read-back could not check (other tables ...)
    # The connection state is a flow table of the datapath's own (eBPF), not conntrack: a packet
    # is "new" (no flow), "established" (a flow of the policy in force; never a bare TCP SYN,
    # which always opens a connection, nor an ICMP message other than echo request/reply) or
    # "related" (an ICMP error quoting such a flow); controller replies pass only as part of
    # the connection the outbound failsafe let the host open (see docs/verification.md).
    flow_states: bool = False
    # Where a packet carrying the steering mark goes (encrypted rules, :mod:`.tunnel`).
    steering: Steering = Steering.ROUTE

    def family(self, family: Family) -> FamilyRules | None:
        for f in self.families:
            if f.family is family:
                return f
        return None
