"""Encrypted rules (``encrypt: true``) in the proof: the tunnel's dimension of the header space.

An encrypted allow says a connection between two groups goes through the WireGuard tunnel: inbound it is
accepted only when it arrived through the WireGuard interface (WireGuard's cryptokey routing guarantees
the inner source address belongs to the sending peer's key) and dropped in the clear, in every mode;
outbound it is *steered* into the tunnel rather than accepted in the clear. So the verdict of a packet
depends on an interface, and at the output hook it is no longer two-valued (drop, accept) but three
(drop, send in the clear, send through the tunnel). The header space gets five bits
(:data:`~stockade.verify.space.TUNNEL_VARS`):

* ``wg``: inbound, the packet arrived through the WireGuard interface; outbound, the question asked
  of the verdict: "does the packet leave through the tunnel?". An outbound function ``f`` is true at
  ``wg=0`` when the packet is sent in the clear and at ``wg=1`` when it is sent through the tunnel
  (both false: dropped), so one BDD equality proves both outcomes and a counterexample says which;
* ``enc``: the packet's connection is marked encrypted (nftables ``ct mark``, iptables ``connmark``,
  the eBPF flow's ``enc``): a connection an encrypted rule accepted;
* ``smark``: the packet carries wireguard-go's socket mark (its own UDP): it passes untouched;
* ``rt``: the steering works: the policy route into the tunnel (nftables/iptables: ``ip rule fwmark
  0x5745 lookup 22341`` whose table's route is the WireGuard interface) or the eBPF redirect's target
  interface exists. Not the firewall: a free bit, so the proof covers a missing route too (the
  packet must then be dropped, never sent in the clear);
* ``mk`` (interpreter-internal): "the packet's mark is the steering mark" where a rule tests it;
  :func:`bind_marks` replaces it by the packets the steering rules marked.

Kernel side (:class:`~stockade.verify.interpret.Interpreter`): :func:`match_bdd` gives the new matches
a meaning, a ``MARK`` verdict (nftables ``meta mark set``, iptables ``-j MARK``, eBPF's redirect of an
encrypted flow) accumulates the steered packets, and :func:`output_exit` turns the output hook's
accepted packets into the three-valued outcome by the read-back's :class:`~stockade.verify.loaded.
Steering`. Policy side (:mod:`.spec`): :class:`TunnelSpec`.

Assumptions (stated in docs/verification.md): the kernel's routing sends an unmarked packet by the
ordinary route (never into the tunnel) and a marked one into the tunnel when ``rt`` (the local table
still wins: a packet on ``lo`` is not steered); the WireGuard peer configuration (keys, allowed IPs) is
what the controller sent (the firewall cannot see it); only wireguard-go sets its socket mark
(``SO_MARK`` needs ``CAP_NET_ADMIN``); the interface the read-back names as the tunnel is the WireGuard
device.
"""

from __future__ import annotations

from stockade.backends.wireguard import SOCKET_MARK, STEER_MARK
from stockade.errors import UnmodelledConstructError
from stockade.verify.loaded import ConnEncrypted, HookName, PacketMark, Steering, Tunnel
from stockade.verify.space import BDDNode, HeaderSpace

TunnelMatch = Tunnel | ConnEncrypted | PacketMark


def match_bdd(space: HeaderSpace, m: TunnelMatch, hook: HookName) -> BDDNode | bool:
    """The packets at ``hook`` (INPUT or OUTPUT) a tunnel match selects."""
    if isinstance(m, ConnEncrypted):
        u = space.var("enc")
    elif isinstance(m, Tunnel):
        if m.side is HookName.INPUT:
            if hook is not HookName.INPUT:  # no input interface at the output hook
                return m.negate
            u = space.var("wg")
        elif m.side is HookName.POSTROUTING:
            if hook is not HookName.OUTPUT:
                return m.negate
            # after steering re-routed it: the tunnel when marked and the route is there (lo: local)
            u = space.var("mk") & space.var("rt") & ~space.loopback
        else:  # the output hook still sees the device routed to before the steering
            return m.negate
    else:
        if m.value not in (STEER_MARK, SOCKET_MARK):
            raise UnmodelledConstructError("rule", f"a test of the packet mark 0x{m.value:x} (only the steering "
                                           f"mark 0x{STEER_MARK:x} and the socket mark 0x{SOCKET_MARK:x} are modelled)")
        if hook is HookName.INPUT:  # received packets carry no mark of ours
            return m.negate
        u = space.var("mk") if m.value == STEER_MARK else space.var("smark") & ~space.var("mk")
    return ~u if m.negate else u


def bind_marks(space: HeaderSpace, accepted: BDDNode, marked: BDDNode) -> tuple[BDDNode, BDDNode]:
    """(accepted, marked) with ``mk`` replaced by the marks the rules set.

    ``marked`` may itself test the mark (``meta mark 0x5747 accept`` before the steering rules); the
    packets' initial mark is never the steering mark, so the marks set are ``marked`` at ``mk=0``; this
    is checked to be a fixed point (the tests of the mark agree with the marks set), else refused."""
    bdd = space.bdd
    first = bdd.let({"mk": False}, marked)
    if bdd.let({"mk": first}, marked) != first:
        raise UnmodelledConstructError("steering", "rules test the packet mark in a way that depends on the marks "
                                       "they set")
    return bdd.let({"mk": first}, accepted), first


def loopback_domain(space: HeaderSpace, local_sigs: set[frozenset[int]], members: dict[int, BDDNode]) -> BDDNode:
    """With membership variables: a packet on ``lo`` has a local peer address (its membership is one
    of the host's own addresses'). The steering marks by peer address, so on a host with encrypted
    rules ``lo`` and the peer address are no longer independent (the class sweep uses
    :func:`loopback_allowed` per class instead)."""
    local = space.false
    for sig in local_sigs:
        cube = space.true
        for pred, u in members.items():
            cube = cube & (u if pred in sig else ~u)
        local = local | cube
    return ~space.loopback | local


def loopback_allowed(local_sigs: set[frozenset[int]], members: frozenset[int]) -> bool:
    """Whether a peer address class can hold a packet on ``lo`` (it holds one of the host's addresses)."""
    return not local_sigs or members in local_sigs


def output_exit(space: HeaderSpace, accepted: BDDNode, marked: BDDNode, steering: Steering) -> BDDNode:
    """The three-valued outbound outcome as one function of ``wg`` (see the module doc)."""
    wg, rt = space.var("wg"), space.var("rt")
    if steering is Steering.ROUTE:  # the mark re-routes: into the tunnel when the route is there
        tunnel = (rt & wg) | (~rt & ~wg)  # no route: the ordinary one (a postrouting guard drops it)
    elif steering is Steering.TUNNEL:  # redirected to the tunnel; no interface: the redirect fails
        tunnel = rt & wg
    elif steering is Steering.CLEAR:  # redirected to another (Ethernet) interface: in the clear
        tunnel = ~wg
    else:
        tunnel = space.false
    steered = marked & ~space.loopback
    return accepted & ((steered & tunnel) | (~steered & ~wg))


class TunnelSpec:
    """What the policy says about the tunnel, for :class:`~stockade.verify.spec.PolicySpec`."""

    def __init__(self, space: HeaderSpace, *, inbound: bool, flow_states: bool, active: bool) -> None:
        self.space = space
        self.active = active  # the host has encrypted rules (else nothing marks, nothing is steered)
        self.inbound = inbound
        self.flow_states = flow_states
        self.wg = space.var("wg")
        self.enc = space.var("enc")
        self.smark = space.var("smark")

    def encrypted_allow(self, services: BDDNode) -> BDDNode:
        """What an encrypted allow that is the first match accepts of ``services``: inbound only
        through the tunnel (in the clear it is dropped, in every mode); outbound everything (its
        steering is :meth:`finish`'s)."""
        return services & self.wg if self.inbound else services

    def finish(self, verdict: BDDNode, matched_encrypted: BDDNode, first_encrypted: BDDNode) -> BDDNode:
        """The final function from the two-valued ``verdict`` (accepted packets).

        Inbound: a packet of an encrypted connection that did not come through the tunnel is dropped
        (before anything could accept it). Outbound: wireguard-go's own packets pass in the clear; a
        packet of an encrypted connection, or one an encrypted allow steers, goes through the tunnel
        when the route is there (else dropped, never in the clear); anything else accepted goes in the
        clear. Which packets an encrypted allow steers: on the eBPF datapath (``flow_states``) those
        it is the first match of (``first_encrypted``); on nftables/iptables every packet its peer and
        services match (``matched_encrypted``, any state: the steering runs before the filter), a
        stricter reading (more in the tunnel, never less)."""
        sp = self.space
        if not self.active:
            return verdict if self.inbound else verdict & ~self.wg
        if self.inbound:
            return verdict & ~(self.enc & ~self.wg)
        by_rule = first_encrypted if self.flow_states else matched_encrypted
        steered = ~self.smark & ~sp.loopback & (self.enc | by_rule)
        accepted = verdict | self.smark
        return accepted & ((steered & self.wg & sp.var("rt")) | (~steered & ~self.wg))
