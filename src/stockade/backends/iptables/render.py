"""Pure rendering of a HostPolicy into an iptables+ipset artifact (no I/O).

The artifact (:class:`IptablesArtifact`) is structured data: ipsets (``hash:net``, one per
peer address set and family) and, per family, Stockade's own chains in the ``filter``
table with their rules written exactly as ``iptables-save`` prints them back, so
``verify`` compares rule lines one to one. :mod:`stockade.backends.iptables.scripts` turns
it into the ``ipset restore`` and ``iptables-restore --noflush`` scripts the runner loads; the
data types live in :mod:`stockade.backends.iptables.model` (re-exported here).

Chains (``<prefix>`` is the backend's chain prefix, ``STOCKADE`` by default), the same in
``iptables`` and ``ip6tables``:

* ``<prefix>-INPUT`` / ``<prefix>-OUTPUT``, each jumped to by exactly one rule in the
  built-in ``INPUT`` / ``OUTPUT`` chain: the failsafe (established/related through the
  conntrack match, loopback, ICMPv6 neighbour discovery) then ``-j <prefix>-IN`` / ``-OUT``;
* ``<prefix>-FORWARD`` (only when asked, for router/bridge hosts): established, ND, then
  traffic to / from the host's own addresses (set ``<prefix>-local-v4``/``-v6``) goes through
  ``<prefix>-IN`` / ``<prefix>-OUT``;
* ``<prefix>-IN`` / ``<prefix>-OUT``: management ports resp. controller path, then the host
  rules in precedence order (override-deny, allow, deny; first match wins), then the mode
  default. How the host rules are laid out (:class:`~.model.Layout`):

  - **lookup** (default): the head ends with ``-g <prefix>-IN-<tier>``; each tier chain
    indexes its TCP/UDP port groups (``--dport LO:HI -g <index chain>``, at most two index
    levels), whose leaves hold ~8 rule entries: per rule a flow-log line and a verdict line,
    ``--dport LO:HI -m set --match-set <peer> src -m comment --comment <rule id> -j ...``;
    then the tier's ICMP / any-protocol rules as entries, then ``-g`` the next tier or
    ``<prefix>-IN-end`` (the default). The exact chain names and line shapes, for a parser of
    ``iptables-save``, are in :mod:`stockade.backends.iptables.lookup`'s docstring; everything
    below the head is reached by ``-g``, so RETURN goes back to the built-in chain as in the list;
  - **list**: the historic layout, kept for the benchmark's side by side: each rule is one
    line per service match in the head chain itself, service test first, peer set second, then
    the default lines (no flow logging: only visibility's would-be drops are logged).

Verdicts: an allow is ``-j RETURN``, back to the built-in chain, so whatever others keep
after our jump (and the chain policy) still has its say: the same meaning as ``accept`` in
nftables' own table. A drop is ``-j DROP``, final everywhere. Built-in chains and their
policies are never changed; *full* mode ends both ``-IN`` and ``-OUT`` with a counted
``-j DROP``; *selective* falls off the end (allowed); *visibility* drops nothing: every
would-be drop is a ``-j NFLOG`` rule (prefix ``stk:pb:<rule id>``, group ``log_group``)
followed by a ``-j RETURN`` with the same matches; *idle* installs nothing.

Flow logging (lookup layout, ``flow_log=True``): every rule entry and the default log the
first packet of each new connection to NFLOG ``log_group`` with ``stk:a:<rule id>`` (accepted)
or ``stk:d:<rule id>`` (dropped) before deciding, a one-way UDP flow once (accepted: conntrack
packet count, ``-m connbytes``; dropped: a ``hashlimit`` on the 4-tuple), see
:func:`.lookup.flow_log_lines`. Management and controller failsafe lines are not logged.

Each rule matches the service first (``-p``/port, a header compare) and the peer ipset
second, so a packet does set lookups only in rules whose port it matches. Everything
interpolated is an int, an IP object or a validated identifier; strings are quoted the way
``iptables-save`` quotes them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from stockade.backends.common import (
    ND_TYPES,
    PORT_MAX,
    ProtoGroup,
    controller_port,
    safe_text,
    service_groups,
)
from stockade.backends.flowlog import FlowAction, validate_log_group
from stockade.backends.iptables.lookup import (
    TIER_LETTERS,
    UDP_ONCE,
    Tier,
    checked_id,
    default_chain,
    drop_once,
    flow_log_lines,
    tier_chains,
)
from stockade.backends.iptables.model import IPSET_NAME_MAX as IPSET_NAME_MAX  # re-exported names
from stockade.backends.iptables.model import (
    SET_MAXELEM,
    ChainNames,
    FamilyRuleset,
    Hook,
    IpSet,
    IptablesVariant,
    IptChain,
    Layout,
    cidr_text,
    ipset_members,
)
from stockade.backends.iptables.names import NFLOG_PREFIX_MAX as NFLOG_PREFIX_MAX
from stockade.backends.iptables.names import comment_id as _rule_id
from stockade.backends.iptables.names import ipset_name as ipset_name
from stockade.backends.iptables.names import local_set_name as local_set_name
from stockade.backends.iptables.names import log_prefix as log_prefix
from stockade.backends.iptables.names import save_string as save_string
from stockade.backends.iptables.names import validate_prefix as validate_prefix
from stockade.backends.iptables.scripts import (
    FilterState,
    IpsetLoad,
    ipset_destroy_script,
    ipset_load_script,
    rules_script,
)
from stockade.backends.iptables.tunnel import (
    MangleRuleset,
    MangleState,
    encrypted_entry,
    encrypted_outbound,
    input_guard,
    mangle_ruleset,
    mangle_script,
    output_guard,
    validate_interface,
)
from stockade.compiler.ir import Direction, HostPolicy, HostRule, WireGuardConfig
from stockade.errors import RenderError
from stockade.model.addresses import AddressRanges, Family, IPAddress
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

MULTIPORT_SLOTS = 15  # xt_multiport: at most 15 ports, a range taking two
DEFAULT_RULE_ID = "default"


@dataclass(frozen=True)
class IptablesArtifact:
    """The rendered policy. ``present`` False (idle): none of our chains, jumps or sets may exist."""

    prefix: str
    variant: IptablesVariant
    workload: str
    mode: EnforcementMode
    present: bool
    sets: tuple[IpSet, ...]
    rulesets: tuple[FamilyRuleset, ...]  # (V4, V6) when present, else ()
    mangle: tuple[MangleRuleset, ...] = ()  # (V4, V6) steering chains when a rule encrypts
    wireguard: WireGuardConfig | None = None  # the tunnel the backend brings up beside the rules
    local_addresses: tuple[IPAddress, ...] = ()  # with ``wireguard``: a change re-sets peer endpoints

    def mangle_ruleset(self, family: Family) -> MangleRuleset | None:
        return next((m for m in self.mangle if m.family is family), None)

    def ruleset(self, family: Family) -> FamilyRuleset:
        for r in self.rulesets:
            if r.family is family:
                return r
        raise KeyError(family)

    def to_text(self) -> str:
        """The scripts an apply runs on a host holding none of our chains (what ``render`` prints)."""
        return self._text

    @cached_property
    def ipset_load(self) -> IpsetLoad:
        """The ``ipset restore`` load-and-swap script, built once per artifact (a frozen value)."""
        return ipset_load_script(self.sets)

    @cached_property
    def _text(self) -> str:
        return artifact_text(self)


def artifact_text(artifact: IptablesArtifact) -> str:
    """Every script of an apply on a host with none of our chains, with a comment before each."""
    v = artifact.variant
    out = [
        f"# Stockade iptables+ipset ruleset: workload {safe_text(artifact.workload)}, mode {artifact.mode.value}, "
        f"iptables-{v.value}, chain prefix {artifact.prefix}"
    ]
    if not artifact.present:
        out.append("# idle: nothing is installed; an apply removes our chains, jumps and sets")
        return "\n".join(out) + "\n"
    load = artifact.ipset_load
    out.append("# ipset -exist restore: new members under temporary names, then swapped onto the live sets")
    out.append(load.text.rstrip("\n"))
    for ruleset in artifact.rulesets:
        empty = FilterState(ruleset.family, (), ())
        out.append(f"# {v.tool(ruleset.family, 'restore')} --noflush (shown for a host without our chains)")
        out.append(rules_script(ruleset, empty, artifact.prefix).rstrip("\n"))
        steering = artifact.mangle_ruleset(ruleset.family)
        if steering is not None:
            out.append(mangle_script(steering, MangleState({}, ()), artifact.prefix).rstrip("\n"))
    out.append("# ipset -exist restore: drop the previous members")
    out.append(ipset_destroy_script(s.temp_name for s in artifact.sets).rstrip("\n"))
    return "\n".join(out) + "\n"




# ---- rule specs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """A service match: the ``-p`` part and the protocol match after it ("" for any protocol)."""

    proto: str
    extra: str = ""


def spec(
    *,
    dst: str = "",
    iface: str = "",
    match: Match | None = None,
    peer: str = "",
    ctstate: bool = False,
    comment: str = "",
    target: str,
) -> str:
    """One rule spec in ``iptables-save`` order: addresses, interface, protocol, matches, target."""
    parts: list[str] = []
    if dst:
        parts.append(f"-d {dst}")
    if iface:
        parts.append(iface)
    if match is not None and match.proto:
        parts.append(f"-p {match.proto}")
        if match.extra:
            parts.append(match.extra)
    if peer:
        parts.append(peer)
    if ctstate:
        parts.append("-m conntrack --ctstate RELATED,ESTABLISHED")
    if comment:
        parts.append(f"-m comment --comment {save_string(comment)}")
    parts.append(target)
    return " ".join(parts)


def _port_matches(proto: str, ranges: tuple[tuple[int, int], ...]) -> list[Match]:
    if ranges == ((0, PORT_MAX),):
        return [Match(proto)]
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return [Match(proto, f"-m {proto} --dport {lo if lo == hi else f'{lo}:{hi}'}")]
    out: list[Match] = []
    chunk: list[str] = []
    slots = 0
    for lo, hi in ranges:
        need = 1 if lo == hi else 2
        if slots + need > MULTIPORT_SLOTS:
            out.append(Match(proto, f"-m multiport --dports {','.join(chunk)}"))
            chunk, slots = [], 0
        chunk.append(str(lo) if lo == hi else f"{lo}:{hi}")
        slots += need
    out.append(Match(proto, f"-m multiport --dports {','.join(chunk)}"))
    return out


def _icmp_matches(group: ProtoGroup) -> list[Match]:
    if group.proto is Proto.ICMP:
        proto, module, option = "icmp", "icmp", "--icmp-type"
    else:
        proto, module, option = "ipv6-icmp", "icmp6", "--icmpv6-type"
    if group.ranges is None:
        return [Match(proto)]
    types = group.values
    if group.proto is Proto.ICMP and 255 in types:
        # xt_icmp treats type 255 as "any type": matching it would widen the rule
        raise RenderError("ICMP type 255 cannot be matched by iptables (it means every type)")
    return [Match(proto, f"-m {module} {option} {t}") for t in types]


def service_matches(entries: Iterable[ServiceEntry], family: Family) -> list[Match]:
    """Matches for ``entries`` in one family; ``[Match("")]`` for any protocol, [] for none."""
    groups = service_groups(entries, family)
    if groups is None:
        return [Match("")]
    out: list[Match] = []
    for g in groups:
        if g.proto.is_icmp:
            out.extend(_icmp_matches(g))
        elif g.ranges is None:
            out.append(Match(g.proto.value))
        else:
            out.extend(_port_matches(g.proto.value, g.ranges))
    return out


# ---- chains -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    prefix: str
    mode: EnforcementMode
    log_group: int
    flow_log: bool = True
    wg_interface: str = ""  # the WireGuard interface, when encrypted rules apply


def _nflog(rule_id: str, opts: _Options, action: FlowAction = FlowAction.WOULD_BLOCK) -> str:
    group = f" --nflog-group {opts.log_group}" if opts.log_group else ""  # iptables-save omits group 0
    return f"-j NFLOG --nflog-prefix {save_string(log_prefix(rule_id, action))}{group}"


def _verdict_rules(rule_id: str, action: Action, opts: _Options, match: Match, peer: str = "") -> list[str]:
    """The rule(s) giving ``action``: RETURN, DROP, or in visibility NFLOG then RETURN."""
    if action is Action.ALLOW:
        targets = ["-j RETURN"]
    elif opts.mode is EnforcementMode.VISIBILITY:
        targets = [_nflog(rule_id, opts), "-j RETURN"]
    else:
        targets = ["-j DROP"]
    return [spec(match=match, peer=peer, comment=rule_id, target=t) for t in targets]


def _default_rules(opts: _Options) -> list[str]:
    if opts.mode is EnforcementMode.FULL:
        return [spec(comment=DEFAULT_RULE_ID, target="-j DROP")]
    if opts.mode is EnforcementMode.VISIBILITY:
        return [spec(comment=DEFAULT_RULE_ID, target=_nflog(DEFAULT_RULE_ID, opts))]  # then falls off: allowed
    return []


def _host_rule_lines(rule: HostRule, family: Family, opts: _Options) -> list[str]:
    direction = "src" if rule.direction is Direction.INBOUND else "dst"
    peer = f"-m set --match-set {ipset_name(opts.prefix, rule.peer, family)} {direction}"
    try:
        matches = service_matches(rule.services, family)
    except RenderError as exc:
        raise RenderError(f"rule {rule.rule_id!r}: {exc}") from exc
    lines: list[str] = []
    for match in matches:
        if rule.encrypt:
            lines += _encrypted_lines(_match_text(match), peer, rule, opts)
            continue
        lines += _verdict_rules(_rule_id(rule.rule_id), rule.action, opts, match=match, peer=peer)
    return lines


def _encrypted_lines(match: str, peer: str, rule: HostRule, opts: _Options) -> list[str]:
    rule_id = checked_id(rule.rule_id)
    udp = match.startswith("-p udp")
    logs = None
    if opts.flow_log:  # one log per flow, not per packet, as for every rule entry
        logs = (f"{drop_once(opts.prefix) + ' ' if udp else ''}{_nflog(rule_id, opts, FlowAction.BLOCK)}",
                f"{UDP_ONCE + ' ' if udp else ''}{_nflog(rule_id, opts, FlowAction.ALLOW)}")
    return encrypted_entry(match, peer, rule, f"-m comment --comment {save_string(rule_id)}", opts.wg_interface, logs)


def _controller_lines(hp: HostPolicy, family: Family) -> list[str]:
    fs = hp.failsafe
    if not fs.controller:
        return []
    controller_port(fs.controller_port)
    match = Match("tcp", f"-m tcp --dport {fs.controller_port}")
    nets = AddressRanges.of(fs.controller).networks(family)
    return [spec(dst=cidr_text(n), match=match, comment="failsafe:controller", target="-j RETURN") for n in nets]


def _failsafe(family: Family, iface: str) -> list[str]:
    lines = [
        spec(ctstate=True, comment="failsafe:established", target="-j RETURN"),
    ]
    if iface:
        lines.append(spec(iface=iface, comment="failsafe:loopback", target="-j RETURN"))
    if family is Family.V6:
        lines += [
            spec(match=Match("ipv6-icmp", f"-m icmp6 --icmpv6-type {t}"), comment="failsafe:nd", target="-j RETURN")
            for t in ND_TYPES
        ]
    return lines


def _controller_reply_lines(hp: HostPolicy, family: Family) -> list[str]:
    """Replies from the controller without conntrack state (see the nftables renderer); a bare SYN
    from the controller's port is not a reply and is not let in."""
    fs = hp.failsafe
    if not fs.controller:
        return []
    comment = save_string("failsafe:controller-reply")
    return [
        f"-s {cidr_text(n)} -p tcp -m tcp --sport {fs.controller_port} ! --tcp-flags SYN,ACK SYN "
        f"-m comment --comment {comment} -j RETURN"
        for n in AddressRanges.of(fs.controller).networks(family)
    ]


def _lookup_peer(rule: HostRule, family: Family, opts: _Options) -> str:
    direction = "src" if rule.direction is Direction.INBOUND else "dst"
    return f"-m set --match-set {ipset_name(opts.prefix, rule.peer, family)} {direction}"


def _flow_log(rule_id: str, action: FlowAction, opts: _Options, udp: bool) -> list[str]:
    """Log lines of one verdict: would-be drops always, accepts and drops when flow logging is on."""
    if action is not FlowAction.WOULD_BLOCK and not opts.flow_log:
        return []
    comment = f"-m comment --comment {save_string(rule_id)}"
    memory = drop_once(opts.prefix) if action is FlowAction.BLOCK else ""
    return flow_log_lines(comment, _nflog(rule_id, opts, action), udp, memory)


def _entry_lines(match: str, rule: HostRule, family: Family, opts: _Options) -> list[str]:
    """One rule at one service match (``-p tcp -m tcp --dport 80``, ``""`` for any protocol):
    its flow-log line, then its verdict line, both with the peer set and the rule id."""
    if rule.encrypt:
        return _encrypted_lines(match, _lookup_peer(rule, family, opts), rule, opts)
    rule_id = checked_id(rule.rule_id)
    if rule.action is Action.ALLOW:
        action, target = FlowAction.ALLOW, "-j RETURN"
    elif opts.mode is EnforcementMode.VISIBILITY:
        action, target = FlowAction.WOULD_BLOCK, "-j RETURN"
    else:
        action, target = FlowAction.BLOCK, "-j DROP"
    head = " ".join(x for x in (match, _lookup_peer(rule, family, opts)) if x)
    comment = f"-m comment --comment {save_string(rule_id)}"
    lines: list[str] = []
    if action is FlowAction.WOULD_BLOCK or opts.flow_log:
        once = ""
        if match.startswith("-p udp"):  # one log per flow, not per packet
            once = (drop_once(opts.prefix) if action is FlowAction.BLOCK else UDP_ONCE) + " "
        lines.append(f"{head} {once}{comment} {_nflog(rule_id, opts, action)}")
    return [*lines, f"{head} {comment} {target}"]


def _match_text(m: Match) -> str:
    return " ".join(x for x in (f"-p {m.proto}" if m.proto else "", m.extra) if x)


def _lookup_default(opts: _Options) -> tuple[str, ...]:
    if opts.mode is EnforcementMode.FULL:
        drop = spec(comment=DEFAULT_RULE_ID, target="-j DROP")
        return (*_flow_log(DEFAULT_RULE_ID, FlowAction.BLOCK, opts, True), drop)
    action = FlowAction.ALLOW if opts.mode is EnforcementMode.SELECTIVE else FlowAction.WOULD_BLOCK
    return tuple(_flow_log(DEFAULT_RULE_ID, action, opts, True))  # then falls off: allowed


def _list_part(rule: HostRule) -> tuple[ServiceEntry, ...] | None:
    """What of ``rule`` stays a list line: None all of it (``any`` protocol), else its ICMP entries."""
    if any(e.proto is Proto.ANY for e in rule.services):
        return None
    return tuple(e for e in rule.services if not e.proto.has_ports)


def _lookup_chains(hp: HostPolicy, family: Family, direction: Direction, opts: _Options) -> tuple[str, list[IptChain]]:
    """The target the head chain ends with (``-g`` it) and every chain below the head."""
    rules = tuple(r for r in hp.rules if r.direction is direction)
    miss = default_chain(opts.prefix, direction)
    tiers: list[IptChain] = []

    def rule_lines(match: str, rule: HostRule) -> list[str]:
        return _entry_lines(match, rule, family, opts)

    for action in reversed(TIER_LETTERS):
        tier_rules = tuple(r for r in rules if r.action is action)
        list_lines: list[str] = []
        for rule in tier_rules:
            part = _list_part(rule)
            try:
                matches = [Match("")] if part is None else service_matches(part, family)
            except RenderError as exc:
                raise RenderError(f"rule {rule.rule_id!r}: {exc}") from exc
            list_lines += [line for m in matches for line in rule_lines(_match_text(m), rule)]
        tier = Tier(action, tier_rules, tuple(list_lines))
        chains = tier_chains(opts.prefix, direction, tier, family, rule_lines, miss)
        if chains:
            tiers = chains + tiers
            miss = chains[0].name
    end = IptChain(default_chain(opts.prefix, direction), _lookup_default(opts))
    return miss, [*tiers, end]


def _family_ruleset(hp: HostPolicy, family: Family, opts: _Options, forward: bool, layout: Layout) -> FamilyRuleset:
    names = ChainNames(opts.prefix)
    inbound = [
        line
        for match in service_matches(hp.failsafe.management, family)
        for line in _verdict_rules("failsafe:management", Action.ALLOW, opts, match=match)
    ]
    inbound += _controller_reply_lines(hp, family)
    outbound = _controller_lines(hp, family)
    below: list[IptChain] = []
    if layout is Layout.LIST:
        for rule in hp.rules:
            (inbound if rule.direction is Direction.INBOUND else outbound).extend(_host_rule_lines(rule, family, opts))
        inbound += _default_rules(opts)
        outbound += _default_rules(opts)
    else:
        for direction, head in ((Direction.INBOUND, inbound), (Direction.OUTBOUND, outbound)):
            first, chains = _lookup_chains(hp, family, direction, opts)
            head.append(f"-g {first}")
            below += chains
    peer_sets = [ipset_name(opts.prefix, n, family) for n in sorted({r.peer for r in hp.rules if r.encrypt})]
    in_guard = input_guard(hp, opts.wg_interface, peer_sets) if opts.wg_interface else []
    out_guard = output_guard() if opts.wg_interface else []
    chains = [
        IptChain(names.entry(Hook.INPUT), (*in_guard, *_failsafe(family, "-i lo"), f"-j {names.inbound}")),
        IptChain(names.entry(Hook.OUTPUT), (*out_guard, *_failsafe(family, "-o lo"), f"-j {names.outbound}")),
    ]
    hooks = [Hook.INPUT, Hook.OUTPUT]
    if forward:
        local = local_set_name(opts.prefix, family)
        chains.append(
            IptChain(
                names.entry(Hook.FORWARD),
                (
                    *_failsafe(family, ""),
                    spec(peer=f"-m set --match-set {local} dst", target=f"-j {names.inbound}"),
                    spec(peer=f"-m set --match-set {local} src", target=f"-j {names.outbound}"),
                ),
            )
        )
        hooks.append(Hook.FORWARD)
    chains += [IptChain(names.inbound, tuple(inbound)), IptChain(names.outbound, tuple(outbound)), *below]
    return FamilyRuleset(family, tuple(chains), tuple(hooks))


def render_iptables(
    hp: HostPolicy,
    prefix: str = "STOCKADE",
    variant: IptablesVariant = IptablesVariant.NFT,
    *,
    forward: bool = False,
    log_group: int = 100,
    layout: Layout = Layout.LOOKUP,
    flow_log: bool = True,
    wg_interface: str | None = None,
) -> IptablesArtifact:
    """Render ``hp`` (pure). Capabilities are checked by the backend before this runs.
    ``wg_interface``: the WireGuard interface encrypted rules use (required when there are any)."""
    validate_prefix(prefix)
    validate_log_group(log_group)
    if hp.mode is EnforcementMode.IDLE:
        return IptablesArtifact(prefix, variant, hp.workload, hp.mode, False, (), ())
    encrypted = hp.wireguard is not None or any(r.encrypt for r in hp.rules)
    wg = validate_interface(wg_interface) if encrypted else ""
    opts = _Options(prefix, hp.mode, log_group, flow_log and layout is Layout.LOOKUP, wg)

    present = {(s.name, s.family) for s in hp.sets}
    for rule in hp.rules:
        for family in (Family.V4, Family.V6):
            if (rule.peer, family) not in present:
                raise RenderError(f"rule {rule.rule_id} references missing set {rule.peer} ({family.name})")
    sets: list[IpSet] = []
    for aset in sorted(hp.sets):
        members = ipset_members(aset.members)
        if len(members) > SET_MAXELEM:
            raise RenderError(f"address set {aset.name} has {len(members)} members (ipset limit {SET_MAXELEM})")
        sets.append(IpSet(ipset_name(prefix, aset.name, aset.family), aset.family, members))
    if forward:
        local = AddressRanges.of(hp.local_addresses)
        for family in (Family.V4, Family.V6):
            sets.append(IpSet(local_set_name(prefix, family), family, ipset_members(local.networks(family))))
    if len({s.name for s in sets}) != len(sets):
        raise RenderError("duplicate ipset names")
    rulesets = tuple(_family_ruleset(hp, family, opts, forward, layout) for family in (Family.V4, Family.V6))
    if not encrypted:
        return IptablesArtifact(prefix, variant, hp.workload, hp.mode, True, tuple(sets), rulesets)
    mangle = tuple(mangle_ruleset(hp, family, prefix, wg, _steer_matches(hp, family, opts))
                   for family in (Family.V4, Family.V6))
    return IptablesArtifact(prefix, variant, hp.workload, hp.mode, True, tuple(sets), rulesets, mangle,
                            hp.wireguard, hp.local_addresses)


def _steer_matches(hp: HostPolicy, family: Family, opts: _Options) -> list[tuple[str, str]]:
    """(service match, peer match) of every encrypted outbound allow: the packets steered."""
    out: list[tuple[str, str]] = []
    for rule in encrypted_outbound(hp):
        peer = _lookup_peer(rule, family, opts)
        out += [(_match_text(m), peer) for m in service_matches(rule.services, family)]
    return out
