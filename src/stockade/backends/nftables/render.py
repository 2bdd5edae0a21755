"""Pure rendering of a HostPolicy into an nftables artifact (no I/O).

The artifact is structured data (:class:`NftablesArtifact`: named sets and chains whose
rules are statements in nft syntax); :meth:`NftablesArtifact.to_text` turns it into the
``nft -f`` transaction that replaces Stockade's table atomically::

    table inet stockade            # make sure it exists ...
    delete table inet stockade     # ... so this cannot fail, then
    table inet stockade { ... }    # the complete new definition

Layout of the table (one ``inet`` table, nothing outside it):

* per peer address set and family, two named sets: ``<peer>_v4_host`` (a hash set of single
  addresses, ``ipv4_addr``) and ``<peer>_v4_net`` (``flags interval``, the wider CIDRs); the
  same with ``_v6_`` and ``ipv6_addr``. Every rule references all four, even when empty, so a
  peer joining changes set elements and never rule text. Why split: on this kernel (6.18) a
  commit touching an interval (rbtree) set costs O(set size) (~12 ms at 100k elements) while a
  hash set costs ~0.03 ms at any size, and workload peers are almost all single addresses.
  No ``auto-merge``: the compiler already emits minimal CIDRs, and auto-merge would fuse
  neighbouring CIDRs into kernel intervals a later per-CIDR ``delete element`` could not find;
* base chains ``input`` / ``output`` (and ``forward`` when asked, for router/bridge hosts)
  holding the failsafe (established/related, loopback, ICMPv6 neighbour discovery) and a
  ``jump`` to the regular chains ``inbound`` / ``outbound``;
* ``inbound`` / ``outbound``: management ports resp. controller path, then the host rules in
  precedence order (override-deny, allow, deny; first match wins), then the mode default.

How the host rules are evaluated (:class:`Layout`):

* **lookup** (default): each tier is entered by ONE dispatch lookup,
  ``meta l4proto . th dport vmap @in_allow`` (``type inet_proto . inet_service : verdict;
  flags interval``), which jumps to the chain of the tier's port group holding the packet's
  port (``in_allow_<i>``: the rules covering exactly that port interval, in precedence
  order, each as its four peer-set tests ``ip saddr @<peer>_v4_host goto <rule chain>``).
  The rule chain (``in_<hash of rule id>``) logs with the rule id and decides, so NFLOG and
  ``explain`` keep the deciding rule. No match: the group chain returns and the tier goes on
  with its ICMP and any-protocol rules as list lines (see :mod:`.lookup`). A packet allowed
  by the 1,000th rule does ~3 lookups per tier and the set tests of its own port's rules,
  instead of walking ~4,000 lines;
* **list**: the historic layout, kept selectable for the benchmark's side by side: each rule
  is up to four lines (v4/v6 x host/net set), service test first, peer set second.

What was measured to choose (nftables 1.0.6, kernel 6.18, this machine): concatenations with
intervals, ``vmap`` with intervals and ``typeof`` all work here. A map keyed by
``ip saddr . meta l4proto . th dport`` with intervals (one lookup per family, whatever the
rules) was built first and passed the differential matrix, but its elements are the peer
addresses times the port groups using each set, and the kernel's pipapo set rebuilds itself in
every transaction: a one-peer delta took 221 ms at 20k elements (1,000 rules, 1,000 peers)
and 2.2 s at 200k (apply 8 s), against 0.03 ms for a peer-set element change, which the
agent's delta path must stay at. Dispatching by port keeps the peer sets exactly as they were
(deltas unchanged, through :mod:`.netlink`), and the map changes only with the rules.
Trade-off: rules piling on one port (1,000 rules all on tcp/443) are still walked, in that
port's group chain only; an any-port TCP/UDP rule is repeated in every group of its tier.

Modes: *full* drops (base chain ``policy drop`` plus an explicit counted drop); *selective*
accepts by default, drops only deny rules not crossed by an allow; *visibility* drops
nothing: would-be drops are counted, logged to NFLOG ``group <log_group>`` with prefix
``stk:pb:<rule id>`` and accepted; *idle* renders an artifact whose text only deletes the table.

Flow logging (visibility in every enforcing mode): every verdict of ``inbound`` / ``outbound``
sees only packets the ``ct state established,related`` failsafe did not accept, i.e. the first
packet of a new connection (a one-way UDP flow stays NEW, so in the lookup layout the verdict
chains and the default log a UDP 4-tuple once per 30 s through the dynamic sets
``flowlog_v4``/``_v6``, see :func:`.lookup.udp_log_once`), and logs it to the same NFLOG group with a verdict prefix:
``stk:a:<rule id>`` accepted, ``stk:d:<rule id>`` dropped, ``stk:pb:<rule id>`` would-be drop
(accepted); the prefixes are defined in :mod:`stockade.backends.flowlog`. Selective mode's
default is a verdict-less log rule, so the packet still falls back to the base chain exactly
as before.

Rule statements are written in the exact form ``nft list`` prints them back (nft 1.0.6), so
``verify`` can compare rules line by line; every rule carries ``comment "<rule id>"``.
Everything interpolated is an int, an IP object or a validated identifier.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from stockade.backends.common import (
    ND_TYPES,
    ProtoGroup,
    checked_rule_id,
    controller_port,
    service_groups,
)
from stockade.backends.flowlog import FlowAction, log_prefix, validate_log_group
from stockade.backends.nftables.artifact import (
    ChainPolicy as ChainPolicy,
)
from stockade.backends.nftables.artifact import (
    Hook as Hook,
)
from stockade.backends.nftables.artifact import (
    Layout as Layout,
)
from stockade.backends.nftables.artifact import (
    NftablesArtifact as NftablesArtifact,
)
from stockade.backends.nftables.artifact import (
    NftChain as NftChain,
)
from stockade.backends.nftables.artifact import (
    NftSet as NftSet,
)
from stockade.backends.nftables.artifact import (
    SetKind as SetKind,
)
from stockade.backends.nftables.artifact import (
    _chain_text as _chain_text,
)
from stockade.backends.nftables.artifact import (
    _set_text as _set_text,
)
from stockade.backends.nftables.artifact import (
    net_element as net_element,
)
from stockade.backends.nftables.lookup import (
    TIER_NAMES,
    TierMap,
    check_unique_chains,
    lookup_rule,
    map_name,
    port_groups,
    port_parts,
    rule_chain,
    udp_log_once,
)
from stockade.backends.wireguard import MTU, SOCKET_MARK, STEER_MARK
from stockade.compiler.ir import Direction, HostPolicy, HostRule
from stockade.errors import RenderError
from stockade.model.addresses import AddressRanges, Family, IPNetwork, ranges_to_networks
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

DEFAULT_RULE_ID = "default"
_IFNAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,14}$")
TUNNEL_MSS = MTU - 60  # IPv6 header (40) + TCP header (20): fits both families
LOCAL_SET = "local"  # forward chain only: the host's own addresses

_TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_SET_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,60}$")

# nft 1.0.6 prints these types by name, every other one as a number.
ICMP_TYPE_NAMES: dict[int, str] = {
    0: "echo-reply", 3: "destination-unreachable", 4: "source-quench", 5: "redirect",
    8: "echo-request", 9: "router-advertisement", 10: "router-solicitation", 11: "time-exceeded",
    12: "parameter-problem", 13: "timestamp-request", 14: "timestamp-reply", 15: "info-request",
    16: "info-reply", 17: "address-mask-request", 18: "address-mask-reply",
}  # fmt: skip
ICMPV6_TYPE_NAMES: dict[int, str] = {
    1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded", 4: "parameter-problem",
    128: "echo-request", 129: "echo-reply", 130: "mld-listener-query", 131: "mld-listener-report",
    132: "mld-listener-done", 133: "nd-router-solicit", 134: "nd-router-advert",
    135: "nd-neighbor-solicit", 136: "nd-neighbor-advert", 137: "nd-redirect",
    138: "router-renumbering", 141: "ind-neighbor-solicit", 142: "ind-neighbor-advert",
    143: "mld2-listener-report",
}  # fmt: skip


def validate_table(table: str) -> str:
    if not _TABLE_RE.match(table):
        raise RenderError(f"invalid nftables table name {table!r} (want [A-Za-z][A-Za-z0-9_]{{0,31}})")
    return table


def nft_set_name(peer: str, family: Family, kind: SetKind) -> str:
    """The nft name of one part of a peer address set: ``<peer>_v4_host``, ``<peer>_v6_net``..."""
    if not _SET_RE.match(peer) or peer == LOCAL_SET:
        raise RenderError(f"address set name {peer!r} is not a valid nft identifier")
    return f"{peer}_v{family.value}_{kind.value}"


def split_members(members: Iterable[IPNetwork]) -> tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]:
    """(single addresses, wider CIDRs) of ``members``, order kept."""
    hosts: list[IPNetwork] = []
    nets: list[IPNetwork] = []
    for m in members:
        (hosts if m.prefixlen == m.max_prefixlen else nets).append(m)
    return tuple(hosts), tuple(nets)


def _comment(rule_id: str) -> str:
    return f'comment "{checked_rule_id(rule_id, "embedded in an nft comment")}"'


def flow_log(action: FlowAction, rule_id: str, group: int) -> str:
    """The NFLOG statement of one verdict: ``log prefix "<prefix><rule id>" group N``."""
    _comment(rule_id)
    return f'log prefix "{log_prefix(action, rule_id)}" group {group}'


def _range_element(lo: int, hi: int, family: Family) -> str:
    nets = ranges_to_networks(((lo, hi),), family)
    if len(nets) == 1:
        return net_element(nets[0])
    return f"{nets[0].network_address}-{nets[-1].broadcast_address}"


def _braced(elems: list[str]) -> str:
    return elems[0] if len(elems) == 1 else "{ " + ", ".join(elems) + " }"


# ---- services ------------------------------------------------------------------------


def _icmp_match(group: ProtoGroup) -> str:
    v6 = group.proto is Proto.ICMPV6
    if group.ranges is None:
        return "meta l4proto ipv6-icmp" if v6 else "meta l4proto icmp"
    names = ICMPV6_TYPE_NAMES if v6 else ICMP_TYPE_NAMES
    elems = [names.get(t, str(t)) for t in group.values]
    return f"{'icmpv6' if v6 else 'icmp'} type {_braced(elems)}"


def service_matches(entries: Iterable[ServiceEntry], family: Family | None) -> list[str]:
    """Match fragments for ``entries``: one per protocol, "" for any protocol.

    ``family`` restricts ICMP (v4 only) and ICMPv6 (v6 only); None keeps both.
    """
    groups = service_groups(entries, family)
    if groups is None:
        return [""]
    out: list[str] = []
    for g in groups:
        if g.proto.is_icmp:
            out.append(_icmp_match(g))
        elif g.ranges is None:
            out.append(f"meta l4proto {g.proto.value}")
        else:
            elems = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in g.ranges]
            out.append(f"{g.proto.value} dport {_braced(elems)}")
    return out


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# ---- rules ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    mode: EnforcementMode
    log_group: int
    wg_interface: str = ""  # the WireGuard interface, when encrypted rules apply


def _tunnel_check(rule: HostRule, opts: _Options) -> str:
    """An encrypted rule's plaintext guard: the packet did not come in by the tunnel (inbound), or
    was not steered into it (outbound: the output hook still shows the device routed to before the
    ``steer`` chain re-routed, so the mark is what is tested; ``postrouting`` checks the device)."""
    if rule.direction is Direction.INBOUND:
        return f'iifname != "{opts.wg_interface}"'
    return f"meta mark != {_mark(STEER_MARK)}"


def _encrypted_drop(rule: HostRule, opts: _Options) -> str:
    """Traffic an encrypted rule matches but that is not in the tunnel: dropped in every mode."""
    return f"{_tunnel_check(rule, opts)} counter {flow_log(FlowAction.BLOCK, rule.rule_id, opts.log_group)} drop"


def _verdict(action: Action, rule_id: str, opts: _Options, encrypt: bool = False) -> str:
    if action is Action.ALLOW and encrypt:  # the connection is marked: its replies take the tunnel too
        return f"ct mark set {_mark(STEER_MARK)} {flow_log(FlowAction.ALLOW, rule_id, opts.log_group)} accept"
    if action is Action.ALLOW:
        return f"{flow_log(FlowAction.ALLOW, rule_id, opts.log_group)} accept"
    if opts.mode is EnforcementMode.VISIBILITY:
        return f"counter {flow_log(FlowAction.WOULD_BLOCK, rule_id, opts.log_group)} accept"
    return f"counter {flow_log(FlowAction.BLOCK, rule_id, opts.log_group)} drop"


def _silent(action: Action, opts: _Options) -> str:
    if action is Action.ALLOW or opts.mode is EnforcementMode.VISIBILITY:
        return "accept"
    return "drop"


def _default_rules(opts: _Options, once: bool = False) -> tuple[str, ...]:
    comment = _comment(DEFAULT_RULE_ID)
    if opts.mode is EnforcementMode.SELECTIVE:  # log only: the base chain's policy accepts
        head = udp_log_once("return", comment) if once else []
        return (*head, f"{flow_log(FlowAction.ALLOW, DEFAULT_RULE_ID, opts.log_group)} {comment}")
    head = udp_log_once(_silent(Action.DENY, opts), comment) if once else []
    verdict = _verdict(Action.DENY, DEFAULT_RULE_ID, opts)
    return (*head, f"{verdict} {comment}")


def _host_rule_lines(rule: HostRule, opts: _Options, services: tuple[ServiceEntry, ...] | None = None) -> list[str]:
    lines: list[str] = []
    verdict = _verdict(rule.action, rule.rule_id, opts, rule.encrypt)
    if rule.encrypt:  # plaintext first: dropped; then what came through the tunnel is accepted
        verdict = f"{_tunnel_check(rule, opts)} counter {flow_log(FlowAction.BLOCK, rule.rule_id, opts.log_group)}" \
            f" drop\0{verdict}"  # each line gets the rule's comment once, below
    comment = _comment(rule.rule_id)
    for family in (Family.V4, Family.V6):
        proto = "ip" if family is Family.V4 else "ip6"
        field = "saddr" if rule.direction is Direction.INBOUND else "daddr"
        matches = service_matches(rule.services if services is None else services, family)
        if services is not None and not services:
            matches = []
        for kind in (SetKind.HOST, SetKind.NET):
            peer = f"{proto} {field} @{nft_set_name(rule.peer, family, kind)}"
            for match in matches:
                lines.extend(_join(match, peer, v, comment) for v in verdict.split("\0"))
    return lines


def _controller_addresses(hp: HostPolicy) -> list[tuple[str, str]]:
    """(``ip``/``ip6``, address element or set) for each family the controller has addresses in."""
    ranges = AddressRanges.of(hp.failsafe.controller)
    out = []
    for family, proto, fam_ranges in ((Family.V4, "ip", ranges.v4), (Family.V6, "ip6", ranges.v6)):
        if fam_ranges:
            out.append((proto, _braced([_range_element(lo, hi, family) for lo, hi in fam_ranges])))
    return out


def _controller_lines(hp: HostPolicy, log_group: int) -> list[str]:
    fs = hp.failsafe
    if not fs.controller:
        return []
    controller_port(fs.controller_port)
    return [
        f"{proto} daddr {elems} tcp dport {fs.controller_port} "
        f"{flow_log(FlowAction.ALLOW, 'failsafe:controller', log_group)} accept {_comment('failsafe:controller')}"
        for proto, elems in _controller_addresses(hp)
    ]


def _controller_reply_lines(hp: HostPolicy) -> list[str]:
    """Replies from the controller even without conntrack state (connections opened before the
    table existed, or after a conntrack flush). A bare SYN from the controller's port is not a
    reply, so it is not let in: the controller cannot open connections through this rule."""
    fs = hp.failsafe
    if not fs.controller:
        return []
    return [
        f"{proto} saddr {elems} tcp sport {fs.controller_port} tcp flags != syn / syn,ack accept "
        f"{_comment('failsafe:controller-reply')}"
        for proto, elems in _controller_addresses(hp)
    ]


def _failsafe_base(loop: str) -> list[str]:
    nd = ", ".join(ICMPV6_TYPE_NAMES[t] for t in ND_TYPES)
    return [
        f"ct state established,related accept {_comment('failsafe:established')}",
        f'{loop} "lo" accept {_comment("failsafe:loopback")}',
        f"icmpv6 type {{ {nd} }} accept {_comment('failsafe:nd')}",
    ]


def _forward_rules() -> tuple[str, ...]:
    nd = ", ".join(ICMPV6_TYPE_NAMES[t] for t in ND_TYPES)
    lines = [
        f"ct state established,related accept {_comment('failsafe:established')}",
        f"icmpv6 type {{ {nd} }} accept {_comment('failsafe:nd')}",
    ]
    for field, target in (("daddr", "inbound"), ("saddr", "outbound")):
        lines.append(f"ip {field} @{LOCAL_SET}_v4 jump {target}")
        lines.append(f"ip6 {field} @{LOCAL_SET}_v6 jump {target}")
    return tuple(lines)


def _list_part(rule: HostRule) -> tuple[ServiceEntry, ...] | None:
    """What of ``rule`` stays a list line in the lookup layout: None all of it (``any``
    protocol), else its ICMP entries (TCP/UDP are in the tier maps)."""
    if any(e.proto is Proto.ANY for e in rule.services):
        return None
    return tuple(e for e in rule.services if not e.proto.has_ports)


def _group_lines(direction: Direction, rules: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """A port group's chain: each rule's four peer sets (v4/v6 x host/net), ``goto`` its verdict."""
    field = "saddr" if direction is Direction.INBOUND else "daddr"
    lines: list[str] = []
    for peer, chain in dict.fromkeys(rules):  # the same rule twice adds nothing
        for family, proto in ((Family.V4, "ip"), (Family.V6, "ip6")):
            for kind in (SetKind.HOST, SetKind.NET):
                lines.append(f"{proto} {field} @{nft_set_name(peer, family, kind)} goto {chain}")
    return tuple(lines)


def _lookup_rules(
    hp: HostPolicy, direction: Direction, opts: _Options
) -> tuple[list[str], list[TierMap], list[NftChain]]:
    """Chain lines, dispatch maps and the group and verdict chains of one direction's rules."""
    lines: list[str] = []
    maps: list[TierMap] = []
    chains: dict[str, NftChain] = {}
    for action in TIER_NAMES:
        tier = tuple(r for r in hp.rules if r.direction is direction and r.action is action)
        check_unique_chains(tier)
        tmap = TierMap(map_name(direction, action), direction, port_groups(tier, Family.V4))
        if tmap.groups:
            maps.append(tmap)
            lines.append(lookup_rule(tmap))
            for i, group in enumerate(tmap.groups):
                name = tmap.group_chain(i)
                chains[name] = NftChain(name, None, None, _group_lines(direction, group.rules))
        for rule in tier:
            parts = port_parts(rule, Family.V4)
            if parts:
                comment = _comment(rule.rule_id)
                verdict = f"{_verdict(rule.action, rule.rule_id, opts, rule.encrypt)} {comment}"
                head = udp_log_once(_silent(rule.action, opts), comment) if 17 in parts else []
                if rule.encrypt:
                    head = [f"{_encrypted_drop(rule, opts)} {comment}", *head]
                chains[rule_chain(rule)] = NftChain(rule_chain(rule), None, None, (*head, verdict))
            part = _list_part(rule)
            if part is None or part:
                lines.extend(_host_rule_lines(rule, opts, part))
    return lines, maps, list(chains.values())


def render_nftables(
    hp: HostPolicy,
    table: str = "stockade",
    *,
    forward: bool = False,
    log_group: int = 100,
    layout: Layout = Layout.LOOKUP,
    wg_interface: str | None = None,
) -> NftablesArtifact:
    """Render ``hp`` (pure). Capabilities are checked by the backend before this runs.
    ``wg_interface``: the WireGuard interface encrypted rules use (required when there are any)."""
    validate_table(table)
    validate_log_group(log_group)
    if hp.mode is EnforcementMode.IDLE:
        return NftablesArtifact(table, hp.workload, hp.mode, False, (), ())
    encrypted = hp.wireguard is not None or any(r.encrypt for r in hp.rules)
    if encrypted and (wg_interface is None or not _IFNAME_RE.match(wg_interface)):
        raise RenderError(f"encrypted rules need a valid WireGuard interface name, got {wg_interface!r}")
    opts = _Options(hp.mode, log_group, wg_interface or "")

    sets: list[NftSet] = []
    for aset in sorted(hp.sets):
        hosts, nets = split_members(aset.members)
        sets.append(NftSet(nft_set_name(aset.name, aset.family, SetKind.HOST), aset.family, SetKind.HOST, hosts))
        sets.append(NftSet(nft_set_name(aset.name, aset.family, SetKind.NET), aset.family, SetKind.NET, nets))
    known = {s.name for s in sets}
    if len(known) != len(sets):
        raise RenderError("duplicate address set names")
    present = {(s.name, s.family) for s in hp.sets}
    for rule in hp.rules:
        for family in (Family.V4, Family.V6):
            if (rule.peer, family) not in present:
                raise RenderError(f"rule {rule.rule_id} references missing set {rule.peer} ({family.name})")

    inbound: list[str] = []
    mgmt_log = flow_log(FlowAction.ALLOW, "failsafe:management", log_group)
    for match in service_matches(hp.failsafe.management, None):
        inbound.append(_join(match, mgmt_log, "accept", _comment("failsafe:management")))
    inbound.extend(_controller_reply_lines(hp))
    outbound = _controller_lines(hp, log_group)
    maps: list[TierMap] = []
    verdict_chains: list[NftChain] = []
    if layout is Layout.LIST:
        for rule in hp.rules:
            (inbound if rule.direction is Direction.INBOUND else outbound).extend(_host_rule_lines(rule, opts))
    else:
        for direction, lines in ((Direction.INBOUND, inbound), (Direction.OUTBOUND, outbound)):
            more, dmaps, dchains = _lookup_rules(hp, direction, opts)
            lines.extend(more)
            maps += dmaps
            verdict_chains += dchains
    once = layout is Layout.LOOKUP
    inbound.extend(_default_rules(opts, once))
    outbound.extend(_default_rules(opts, once))

    policy = ChainPolicy.DROP if hp.mode is EnforcementMode.FULL else ChainPolicy.ACCEPT
    in_guard, out_guard, route, post = _tunnel_lines(hp, opts) if encrypted else ([], [], [], [])
    chains = [
        NftChain("input", Hook.INPUT, policy, (*in_guard, *_failsafe_base("iif"), "jump inbound")),
        NftChain("output", Hook.OUTPUT, policy, (*out_guard, *_failsafe_base("oif"), "jump outbound")),
    ]
    if encrypted:
        chains.append(NftChain("steer", Hook.OUTPUT, ChainPolicy.ACCEPT, tuple(route), "route", "mangle"))
        chains.append(NftChain("postrouting", Hook.POSTROUTING, ChainPolicy.ACCEPT, tuple(post)))
    if forward:
        local = AddressRanges.of(hp.local_addresses)
        for family in (Family.V4, Family.V6):
            sets.append(NftSet(f"{LOCAL_SET}_v{family.value}", family, SetKind.NET, local.networks(family)))
        fwd = _forward_rules()
        chains.append(NftChain("forward", Hook.FORWARD, ChainPolicy.ACCEPT, fwd))
    chains += [
        NftChain("inbound", None, None, tuple(inbound)),
        NftChain("outbound", None, None, tuple(outbound)),
        *verdict_chains,
    ]
    return NftablesArtifact(table, hp.workload, hp.mode, True, tuple(sets), tuple(chains), tuple(maps), layout,
                            hp.wireguard if encrypted else None, hp.local_addresses if encrypted else ())


# ---- encryption (WireGuard) ------------------------------------------------------------


def _mark(value: int) -> str:
    return f"0x{value:08x}"


def _tunnel_lines(hp: HostPolicy, opts: _Options) -> tuple[list[str], list[str], list[str], list[str]]:
    """(input guard, output guard, ``steer`` route chain, postrouting guard) of a host with encrypted rules.

    * input: a packet of an encrypted connection (``ct mark``) that did not come through the
      tunnel is dropped before the established/related failsafe could accept it (a forged
      plaintext packet into an encrypted connection); the peers' WireGuard packets are accepted.
    * output: wireguard-go's own packets (its fwmark) pass.
    * postrouting (where the device is the one re-routed to): a marked packet that is not leaving
      through the tunnel (wireguard-go dead, the interface deleted, the route gone) is dropped:
      never sent in the clear.
    * steer (``type route``, so the kernel re-routes after the mark): a packet routed to ``lo``
      (the host talking to itself, e.g. in its own encrypted rule's peer set) is left alone;
      packets of encrypted connections and the first packets the encrypted outbound rules match
      get the steering mark, which the policy-routing rule sends into the tunnel; their SYNs get
      the tunnel's MSS (the
      socket sized its segments for the device it was first routed to: without the clamp a bulk
      transfer stalls on segments larger than the tunnel's MTU).
    """
    wg = f'"{opts.wg_interface}"'
    enc = _comment("failsafe:encrypted")
    wgc = _comment("failsafe:wireguard")
    steer, sock = _mark(STEER_MARK), _mark(SOCKET_MARK)
    in_guard = [f"ct mark {steer} iifname != {wg} counter drop {enc}"]
    out_guard = [f"meta mark {sock} accept {wgc}"]
    post = [f"meta mark {steer} oifname != {wg} counter drop {enc}"]
    if hp.wireguard is not None:
        # from the encrypted rules' peer sets (every peer is in one, by any of its addresses: a
        # multi-homed peer's packets may leave by another one), never from a list of peers: the
        # rules do not change when a peer does (a peer delta), and set deltas keep them current
        port = hp.wireguard.listen_port
        for family, proto in ((Family.V4, "ip"), (Family.V6, "ip6")):
            for name in sorted({r.peer for r in hp.rules if r.encrypt}):
                for kind in (SetKind.HOST, SetKind.NET):
                    in_guard.append(f"{proto} saddr @{nft_set_name(name, family, kind)} udp dport {port} accept {wgc}")
    # traffic to the host itself (routed to lo) never takes the tunnel: marked, the local route
    # would keep it on lo and the postrouting guard drop it (eBPF never attaches to lo either)
    route = ['oif "lo" accept', f"meta mark {sock} accept", f"ct mark {steer} meta mark set {steer}"]
    for rule in hp.rules:
        if not (rule.encrypt and rule.action is Action.ALLOW and rule.direction is Direction.OUTBOUND):
            continue
        for family, proto in ((Family.V4, "ip"), (Family.V6, "ip6")):
            for match in service_matches(rule.services, family):
                for kind in (SetKind.HOST, SetKind.NET):
                    peer = f"{proto} daddr @{nft_set_name(rule.peer, family, kind)}"
                    route.append(_join(match, peer, f"meta mark set {steer} ct mark set {steer}"))
    # the socket chose its MSS for the device it was routed to first: clamp to the tunnel's MTU
    route.append(f"meta mark {steer} tcp flags & syn == syn tcp option maxseg size set {TUNNEL_MSS}")
    return in_guard, out_guard, route, post
