"""The reference evaluator: the oracle every backend is tested against.

Given a policy and one connection attempt (source, destination, protocol, port),
it answers the verdict and the deciding rule on each side: outbound at the source
workload, inbound at the destination workload. An address that belongs to no
workload is unmanaged and has no side.

It reads the model directly (rulesets with their scopes, deny rules) and shares no
code with the compiler, so a compiler bug cannot hide in both.

Semantics:

* A side exists only for a workload whose mode is not idle.
* Failsafe first: inbound management services, outbound to the controller,
  ICMPv6 neighbour discovery, a workload talking to itself.
* Then precedence: override-deny > allow > deny > the mode's default
  (full: block; selective: allow; visibility: evaluated as full, but "would-block").
* Kubernetes NetworkPolicy (``stockade.model.netpol``) sits between override-deny and the rest,
  as upstream's AdminNetworkPolicy tiers do: a direction some NetworkPolicy isolates on this
  workload is allowed exactly by the union of the NetworkPolicy rules that match
  (``netpol/<ns>/<name>/<direction>/<i>``) and blocked otherwise (``netpol/<ns>/<name>/<direction>``);
  Stockade's allow and deny rules only decide directions no NetworkPolicy isolates.
* IP lists match by address; label selectors and ``all`` match workloads. A provider
  IP list never puts a rule on a workload's inbound side (and a consumer IP list
  never on its outbound side): IP lists are peers, not hosts.
* Encryption (``encrypt: true`` on a rule or its ruleset): among the allow rules that match a
  side, an encrypted one wins (the lowest-numbered encrypted rule decides), so a plain allow can
  never carry in the clear what another rule says to encrypt. Both sides of an allowed encrypted
  connection are workloads that can run WireGuard (not idle, with a registered key); when the other
  end cannot, the side that requires encryption blocks (in every mode: the traffic is never sent
  or accepted in the clear). ``Evaluation.encrypted`` says whether the allowed traffic goes through
  the tunnel and ``encrypted_by`` names the rule.
* A connection that cannot exist is refused with a ValidationError, never answered:
  source and destination of different families, ICMP between IPv6 addresses or ICMPv6
  between IPv4 addresses (an answer about ICMPv4 echo between IPv6 hosts would describe
  a packet the kernel never sees).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from stockade.errors import Issue, ValidationError
from stockade.model.addresses import AddressRanges, IPAddress
from stockade.model.labels import LabelGroup
from stockade.model.netpol import KubeNetworkPolicy, NetpolDirection, NetpolRule
from stockade.model.policy import Policy
from stockade.model.rules import Action, ConsumerScope
from stockade.model.selectors import AllWorkloads, IPListSelector, LabelSelector, Selector
from stockade.model.services import Proto, Service, ServiceEntry
from stockade.model.workloads import EnforcementMode, Workload

ND_TYPES = frozenset({133, 134, 135, 136, 137})


class Verdict(Enum):
    ALLOWED = "allowed"
    POTENTIALLY_BLOCKED = "potentially-blocked"
    BLOCKED = "blocked"


def check_connection(src: IPAddress, dst: IPAddress, proto: Proto) -> None:
    """Raise ValidationError unless a packet from ``src`` to ``dst`` on ``proto`` can exist."""
    issues: list[Issue] = []
    if src.version != dst.version:
        issues.append(Issue("", 0, "dst", f"{src} and {dst} are of different address families"))
    elif proto is Proto.ICMP and src.version == 6:
        issues.append(Issue("", 0, "proto", "icmp is IPv4 only: use icmpv6 between IPv6 addresses"))
    elif proto is Proto.ICMPV6 and src.version == 4:
        issues.append(Issue("", 0, "proto", "icmpv6 is IPv6 only: use icmp between IPv4 addresses"))
    if issues:
        raise ValidationError(issues)


@dataclass(frozen=True)
class SideDecision:
    workload: str
    mode: EnforcementMode
    action: str  # "allow" | "block" | "would-block"
    rule_id: str  # deciding rule, "default", or "failsafe:<what>"
    encrypted: bool = False  # the deciding allow rule says encrypt (or the block is for want of a peer key)


@dataclass(frozen=True)
class Evaluation:
    verdict: Verdict
    outbound: SideDecision | None
    inbound: SideDecision | None
    encrypted: bool = False  # allowed through WireGuard between the two workloads
    encrypted_by: str = ""  # the rule that says so ("ruleset/<name>/<j>")


@dataclass(frozen=True)
class _Candidate:
    action: Action
    rule_id: str
    scope: LabelSelector | None  # None: no scope (deny rules, unscoped rulesets)
    consumers: tuple[Selector, ...]
    providers: tuple[Selector, ...]
    intra: bool
    services: tuple[ServiceEntry, ...]
    encrypt: bool = False


class Evaluator:
    """Evaluates many connections against one policy (lookups built once)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._groups: dict[str, LabelGroup] = policy.group_map()
        self._iplists: dict[str, AddressRanges] = {n: i.ranges() for n, i in policy.ip_list_map().items()}
        services: dict[str, Service] = policy.service_map()
        self._owner: dict[IPAddress, Workload] = {}
        for w in policy.workloads:
            for a in w.addresses:
                self._owner[a] = w
        self._candidates: list[_Candidate] = []
        # NetworkPolicy: (workload, direction) -> isolating policies / (rule id, rule) that apply to it
        self._np_isolating: dict[tuple[str, NetpolDirection], list[KubeNetworkPolicy]] = {}
        self._np_rules: dict[tuple[str, NetpolDirection], list[tuple[str, NetpolRule]]] = {}
        for np in policy.network_policies:
            for nd in NetpolDirection:
                if np.isolates(nd):
                    for pod in np.selected:
                        self._np_isolating.setdefault((pod, nd), []).append(np)
            for r in np.rules:
                if not np.isolates(r.direction):
                    continue
                for pod in r.targets & np.selected:
                    self._np_rules.setdefault((pod, r.direction), []).append((np.rule_id(r.direction, r.index), r))

        def entries(names: tuple[str, ...]) -> tuple[ServiceEntry, ...]:
            found: list[ServiceEntry] = []
            for n in names:
                if n in services:
                    found.extend(services[n].entries)
                elif n == "any":
                    found.append(ServiceEntry(Proto.ANY))
            return tuple(found)

        for rs in policy.rulesets:
            scopes: tuple[LabelSelector | None, ...] = rs.scopes or (None,)
            for j, rule in enumerate(rs.rules):
                for scope in scopes:
                    self._candidates.append(
                        _Candidate(
                            Action.ALLOW,
                            f"ruleset/{rs.name}/{j}",
                            scope,
                            rule.consumers,
                            rule.providers,
                            rule.consumers_scope is ConsumerScope.INTRA,
                            entries(rule.services),
                            rs.encrypts(j),
                        )
                    )
        for d in policy.deny_rules:
            self._candidates.append(
                _Candidate(
                    d.action, f"deny/{d.name}", None, d.consumers, d.providers, False, entries(d.services)
                )
            )

    def owner(self, addr: IPAddress) -> Workload | None:
        return self._owner.get(addr)

    # ---- matching --------------------------------------------------------------
    def _in_scope(self, w: Workload, scope: LabelSelector | None) -> bool:
        return scope is None or scope.matches(w.labels, self._groups)

    def _workload_matches(self, sel: Selector, w: Workload) -> bool:
        if isinstance(sel, AllWorkloads):
            return True
        if isinstance(sel, LabelSelector):
            return sel.matches(w.labels, self._groups)
        return False

    def _address_matches(self, sel: Selector, addr: IPAddress, owner: Workload | None) -> bool:
        if isinstance(sel, IPListSelector):
            ranges = self._iplists.get(sel.ip_list)
            return ranges is not None and ranges.contains(addr)
        return owner is not None and self._workload_matches(sel, owner)

    def _side(
        self,
        host: Workload,
        inbound: bool,
        peer_addr: IPAddress,
        peer: Workload | None,
        proto: Proto,
        port: int | None,
    ) -> SideDecision:
        mode = host.mode
        fs = self.policy.failsafe
        if proto is Proto.ICMPV6 and port in ND_TYPES:
            return SideDecision(host.name, mode, "allow", "failsafe:nd")
        if peer is not None and peer.name == host.name:
            return SideDecision(host.name, mode, "allow", "failsafe:loopback")
        if inbound and any(e.matches(proto, port) for e in fs.management):
            return SideDecision(host.name, mode, "allow", "failsafe:management")
        if (
            not inbound
            and proto is Proto.TCP
            and port == fs.controller_port
            and any(peer_addr in net for net in fs.controller if net.version == peer_addr.version)
        ):
            return SideDecision(host.name, mode, "allow", "failsafe:controller")

        found: dict[Action, str] = {}
        encrypted_by = ""
        for c in self._candidates:
            if not any(e.matches(proto, port) for e in c.services):
                continue
            if inbound:
                # host is the provider, peer the consumer
                if not self._in_scope(host, c.scope):
                    continue
                if not any(self._workload_matches(p, host) for p in c.providers):
                    continue
                if not any(self._consumer_peer(s, c, peer_addr, peer) for s in c.consumers):
                    continue
            else:
                # host is the consumer, peer the provider
                if not any(self._workload_matches(s, host) for s in c.consumers):
                    continue
                if c.intra and not self._in_scope(host, c.scope):
                    continue
                if not any(self._provider_peer(p, c, peer_addr, peer) for p in c.providers):
                    continue
            if c.action not in found or c.rule_id < found[c.action]:
                found[c.action] = c.rule_id
            if c.encrypt and (not encrypted_by or c.rule_id < encrypted_by):
                encrypted_by = c.rule_id

        direction = NetpolDirection.INGRESS if inbound else NetpolDirection.EGRESS
        isolating = self._np_isolating.get((host.name, direction))
        if Action.OVERRIDE_DENY in found:
            decided = ("block", found[Action.OVERRIDE_DENY])
        elif isolating:
            decided = self._netpol_side(host, direction, isolating, peer_addr, peer, proto, port)
        elif encrypted_by:
            if peer is None or not _can_encrypt(peer):
                # nobody to run the tunnel with: never in the clear, whatever the mode
                return SideDecision(host.name, mode, "block", encrypted_by, encrypted=True)
            return SideDecision(host.name, mode, "allow", encrypted_by, encrypted=True)
        elif Action.ALLOW in found:
            decided = ("allow", found[Action.ALLOW])
        elif Action.DENY in found:
            decided = ("block", found[Action.DENY])
        elif mode is EnforcementMode.SELECTIVE:
            decided = ("allow", "default")
        else:
            decided = ("block", "default")
        action, rule_id = decided
        if action == "block" and mode is EnforcementMode.VISIBILITY:
            action = "would-block"
        return SideDecision(host.name, mode, action, rule_id)

    def _netpol_side(
        self,
        host: Workload,
        direction: NetpolDirection,
        isolating: list[KubeNetworkPolicy],
        peer_addr: IPAddress,
        peer: Workload | None,
        proto: Proto,
        port: int | None,
    ) -> tuple[str, str]:
        """A direction isolated by NetworkPolicy: allowed by the union of their rules, else blocked."""
        allowed: str | None = None
        for rule_id, r in self._np_rules.get((host.name, direction), ()):
            if allowed is not None and rule_id >= allowed:
                continue
            if not any(e.matches(proto, port) for e in r.services):
                continue
            if r.matches_peer(peer.name if peer is not None else None, r.peer_cidrs.contains(peer_addr)):
                allowed = rule_id
        if allowed is not None:
            return "allow", allowed
        return "block", min(np.isolation_id(direction) for np in isolating)

    def _consumer_peer(self, sel: Selector, c: _Candidate, addr: IPAddress, peer: Workload | None) -> bool:
        if isinstance(sel, IPListSelector):
            return self._address_matches(sel, addr, peer)
        if peer is None or not self._workload_matches(sel, peer):
            return False
        return not c.intra or self._in_scope(peer, c.scope)

    def _provider_peer(self, sel: Selector, c: _Candidate, addr: IPAddress, peer: Workload | None) -> bool:
        if isinstance(sel, IPListSelector):
            return self._address_matches(sel, addr, peer)
        return peer is not None and self._workload_matches(sel, peer) and self._in_scope(peer, c.scope)

    # ---- public ------------------------------------------------------------------
    def evaluate(self, src: IPAddress, dst: IPAddress, proto: Proto, port: int | None) -> Evaluation:
        """The verdict of one connection; ValidationError when it cannot exist (``check_connection``)."""
        check_connection(src, dst, proto)
        src_w = self._owner.get(src)
        dst_w = self._owner.get(dst)
        outbound = None
        inbound = None
        if src_w is not None and src_w.mode is not EnforcementMode.IDLE:
            outbound = self._side(src_w, False, dst, dst_w, proto, port)
        if dst_w is not None and dst_w.mode is not EnforcementMode.IDLE:
            inbound = self._side(dst_w, True, src, src_w, proto, port)
        actions = {d.action for d in (outbound, inbound) if d is not None}
        if "block" in actions:
            verdict = Verdict.BLOCKED
        elif "would-block" in actions:
            verdict = Verdict.POTENTIALLY_BLOCKED
        else:
            verdict = Verdict.ALLOWED
        by = ""
        if verdict is not Verdict.BLOCKED:
            for d in (outbound, inbound):
                if d is not None and d.encrypted and (not by or d.rule_id < by):
                    by = d.rule_id
        return Evaluation(verdict, outbound, inbound, bool(by), by)


def _can_encrypt(w: Workload) -> bool:
    """A workload that can be a WireGuard peer: enforcing in some mode and holding a registered key."""
    return w.mode is not EnforcementMode.IDLE and w.wireguard is not None


def evaluate(policy: Policy, src: IPAddress, dst: IPAddress, proto: Proto, port: int | None) -> Evaluation:
    """One-off evaluation; build an ``Evaluator`` to evaluate many connections."""
    return Evaluator(policy).evaluate(src, dst, proto, port)
