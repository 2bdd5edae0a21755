"""The policy side of the proof: which packets a HostPolicy lets through, as a BDD per address class.

This follows the reference evaluator (:mod:`stockade.evaluator`, ``_side``) for one host and
one direction, on the compiled HostPolicy, and adds the two things that exist only below the
level of a connection attempt (both part of Stockade's failsafe, see ``docs/verification.md``):

1. conntrack ``established`` / ``related`` packets are accepted (they belong to a connection
   the policy already admitted);
2. the loopback interface is accepted (the evaluator's "a workload talking to itself");
3. ICMPv6 neighbour discovery (types 133-137) is accepted;
4. inbound: the management services; replies from the controller (TCP from a controller
   address and port that is not a bare SYN: a reply the policy's controller path admitted);
   outbound: TCP to a controller address and port (with ``flow_states``, a datapath that
   tracks connections in its own flow table, eBPF: no inbound clause, the replies are
   ``established`` packets of the connection the outbound clause admitted);
5. the host rules of the direction in their order (override-deny, allow, deny: first match
   wins); a rule matches when the peer address is in its set (this family) and the packet in
   one of its services (ICMP only in IPv4, ICMPv6 only in IPv6, ``any`` every protocol);
6. the mode's default: full drops, selective accepts; visibility accepts everything (its
   blocks are only "would-block");
7. encrypted rules (:mod:`.tunnel`): the peers' WireGuard UDP (from an encrypted rule's peer set
   to the listen port) is accepted inbound; an encrypted allow accepts inbound only through the
   tunnel (in the clear: dropped, in every mode) and steers outbound; packets of an encrypted
   connection are dropped inbound outside the tunnel and steered outbound. Outbound, the
   function tells the clear (``wg=0``) from the tunnel (``wg=1``).

An idle host's policy accepts everything (Stockade installs nothing).
"""

from __future__ import annotations

from stockade.backends.common import ND_TYPES, entry_bounds
from stockade.compiler.ir import Direction, HostPolicy
from stockade.model.addresses import Family
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from stockade.verify.loaded import Field
from stockade.verify.space import ACK, SYN, BDDNode, HeaderSpace
from stockade.verify.tunnel import TunnelSpec

CONTROLLER_PRED = "controller"


def services_bdd(space: HeaderSpace, entries: tuple[ServiceEntry, ...], family: Family | None) -> BDDNode:
    u = space.false
    for e in entries:
        if e.proto is Proto.ANY:
            return space.true
        if (e.proto is Proto.ICMP and family is Family.V6) or (e.proto is Proto.ICMPV6 and family is Family.V4):
            continue
        number = {Proto.TCP: 6, Proto.UDP: 17, Proto.SCTP: 132, Proto.ICMP: 1, Proto.ICMPV6: 58}[e.proto]
        part = space.proto(number)
        if e.first is not None:
            field = Field.DPORT if e.proto.has_ports else Field.ICMP_TYPE
            part = part & space.field_in(field, (entry_bounds(e),))
        u = u | part
    return u


def first_match(space: HeaderSpace, leaves: list[tuple[BDDNode, BDDNode]]) -> tuple[BDDNode, BDDNode]:
    """First match over rules given as ``(matched, accepted)`` (``accepted`` within ``matched``), in
    order: the packets some rule matches and those the first matching rule accepts.

    Merged pairwise in a balanced tree (``M = M1 | M2``, ``A = A1 | (A2 & ~M1)``: the first half
    wins where it matches) instead of rule by rule onto everything decided so far: each of the
    log(n) levels costs about the size of the result, where the rule-by-rule build costs n times
    it (1,000 rules over 100,000 peers: 250 us per rule, most of the policy side's time)."""
    level = leaves
    if not level:
        return space.false, space.false
    ite = space.bdd.ite  # ``A1 | (A2 & ~M1)`` is ``ite(M1, A1, A2)`` as A1 lies within M1: one CUDD call
    while len(level) > 1:
        nxt = []
        for i in range(0, len(level) - 1, 2):
            (m1, a1), (m2, a2) = level[i], level[i + 1]
            nxt.append((m1 | m2, ite(m1, a1, a2)))
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class PolicySpec:
    """What ``hp`` accepts in one family and direction; address sets are predicates."""

    def __init__(
        self,
        space: HeaderSpace,
        hp: HostPolicy,
        family: Family,
        direction: Direction,
        pred_of: dict[str, int],
        *,
        flow_states: bool = False,
    ) -> None:
        self.space = space
        self.hp = hp
        self.pred_of = pred_of  # HostPolicy set name (and CONTROLLER_PRED) -> predicate id
        sp = space
        fs = hp.failsafe
        base = sp.ct_in(("established", "related")) | sp.loopback
        if family is Family.V6:
            base = base | (sp.proto(58) & sp.field_in(Field.ICMP_TYPE, tuple((t, t) for t in ND_TYPES)))
        self.base = base
        tcp_ctl = sp.proto(6)
        if direction is Direction.INBOUND:
            self.base = self.base | services_bdd(sp, fs.management, None)
            not_bare_syn = ~sp.tcp_flags(SYN | ACK, SYN)
            self.controller = tcp_ctl & sp.field_in(Field.SPORT, ((fs.controller_port,) * 2,)) & not_bare_syn
            if flow_states:  # a flow-table datapath admits replies only within the tracked connection
                self.controller = sp.false
        else:
            self.controller = tcp_ctl & sp.field_in(Field.DPORT, ((fs.controller_port,) * 2,))
        visibility = hp.mode is EnforcementMode.VISIBILITY
        encrypts = hp.wireguard is not None or any(r.encrypt for r in hp.rules)
        self.tunnel = TunnelSpec(sp, inbound=direction is Direction.INBOUND, flow_states=flow_states,
                                 active=encrypts)
        self.rules: list[tuple[BDDNode, bool]] = []  # (services, accepts), in precedence order
        self.rule_preds: list[int] = []
        self.encrypted: set[int] = set()  # indices of the encrypted allows
        self.by_pred: dict[int, list[int]] = {}  # predicate -> indices of the rules on that set
        for r in hp.rules:
            if r.direction is direction and r.peer in pred_of:
                accepts = r.action is Action.ALLOW or visibility
                if r.encrypt and r.action is Action.ALLOW:
                    self.encrypted.add(len(self.rules))
                self.by_pred.setdefault(pred_of[r.peer], []).append(len(self.rules))
                self.rules.append((services_bdd(sp, r.services, family), accepts))
                self.rule_preds.append(pred_of[r.peer])
        # the peers' WireGuard packets, from every encrypted rule's peer set (any direction's)
        self.wg_preds: frozenset[int] = frozenset()
        self.wg_udp = sp.false
        if hp.wireguard is not None and direction is Direction.INBOUND:
            self.wg_preds = frozenset(pred_of[r.peer] for r in hp.rules if r.encrypt and r.peer in pred_of)
            port = hp.wireguard.listen_port
            self.wg_udp = sp.proto(17) & sp.field_in(Field.DPORT, ((port, port),))
        self.default_accepts = hp.mode is not EnforcementMode.FULL
        self._memo: dict[frozenset[int], BDDNode] = {}

    def accept(self, sig: frozenset[int]) -> BDDNode:
        """Packets from/to a peer address in exactly the predicates ``sig`` that the policy accepts."""
        sp = self.space
        if self.hp.mode is EnforcementMode.IDLE:
            return sp.true
        found = self._memo.get(sig)
        if found is not None:
            return found
        acc = self.base
        if self.pred_of.get(CONTROLLER_PRED, -1) in sig:
            acc = acc | self.controller
        if self.wg_preds & sig:
            acc = acc | self.wg_udp
        rest = ~acc
        picked: set[int] = set()
        for p in sig:
            picked.update(self.by_pred.get(p, ()))
        matched_enc, first_enc = sp.false, sp.false
        for i in sorted(picked):
            svc, accepts = self.rules[i]
            if i in self.encrypted:
                acc = acc | (rest & self.tunnel.encrypted_allow(svc))
                matched_enc, first_enc = matched_enc | svc, first_enc | (rest & svc)
            elif accepts:
                acc = acc | (rest & svc)
            rest = rest & ~svc
        if self.default_accepts:
            acc = acc | rest
        acc = self.tunnel.finish(acc, matched_enc, first_enc)
        self._memo[sig] = acc
        return acc

    def accept_symbolic(self, members: dict[int, BDDNode]) -> BDDNode:
        """What the policy accepts with each set's membership a BDD (``members``: predicate ->
        BDD over membership variables) instead of one address class's constants."""
        sp = self.space
        if self.hp.mode is EnforcementMode.IDLE:
            return sp.true
        acc = self.base
        if CONTROLLER_PRED in self.pred_of:
            acc = acc | (members[self.pred_of[CONTROLLER_PRED]] & self.controller)
        for p in self.wg_preds:
            acc = acc | (members[p] & self.wg_udp)
        if not self.encrypted:
            # first match over the rules as a balanced merge of (matched, accepted) blocks (see
            # :func:`first_match`): each step works on BDDs of its own half, not on the whole
            # decision list built so far
            leaves = [(m, m if accepts else sp.false)
                      for (svc, accepts), pred in zip(self.rules, self.rule_preds, strict=True)
                      if (m := members[pred] & svc) != sp.false]
            matched, accepted = first_match(sp, leaves)
            after = accepted | ~matched if self.default_accepts else accepted
            return self.tunnel.finish(acc | after, sp.false, sp.false)
        rest = ~acc
        matched_enc, first_enc = sp.false, sp.false
        for i, ((svc, accepts), pred) in enumerate(zip(self.rules, self.rule_preds, strict=True)):
            m = members[pred] & svc
            if i in self.encrypted:
                acc = acc | (rest & self.tunnel.encrypted_allow(m))
                matched_enc, first_enc = matched_enc | m, first_enc | (rest & m)
            elif accepts:
                acc = acc | (rest & m)
            rest = rest & ~m
        if self.default_accepts:
            acc = acc | rest
        return self.tunnel.finish(acc, matched_enc, first_enc)
