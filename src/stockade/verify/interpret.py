"""The loaded ruleset as a function over the header space: which packets a hook accepts.

For one family, hook and address class, :meth:`Interpreter.hook_accept` walks the base chains
of the hook symbolically (every rule is a BDD of the packets it matches; ``rest`` is what no
earlier rule decided) with netfilter's semantics:

* ``accept`` / ``drop`` decide for this base chain; ``return`` and falling off the end go back
  to the caller (in a base chain: its policy);
* ``jump X``: packets X decides are decided, those X returns go on with the next rule;
  ``goto X``: the same, but those X returns leave this chain too;
* a verdict map applies the verdict of the element holding ``l4proto . dport``; no element:
  the next rule;
* rules without a verdict (log, counter, set add) decide nothing;
* several base chains at one hook (priorities): a packet passes only if every one accepts
  (a drop anywhere is final; an accept only ends that chain).

A chain's result depends on the address class only through the sets it (transitively) tests,
so results are memoised per (chain, those sets' membership): a verdict chain is computed once,
a port-group chain once per combination of its peers.
"""

from __future__ import annotations

import bisect

from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.verify.loaded import (
    Addr,
    AddrIn,
    Chain,
    CtState,
    FamilyIs,
    FamilyRules,
    Field,
    HookName,
    InDynamicSet,
    IntIn,
    Kind,
    Loopback,
    Match,
    Rule,
    TcpFlags,
    Verdict,
)
from stockade.verify.space import BDDNode, HeaderSpace


def peer_field(hook: HookName) -> Addr:
    return Addr.SADDR if hook is HookName.INPUT else Addr.DADDR


def referenced_sets(rules: FamilyRules, addr: Addr) -> list[str]:
    """The address sets some rule of ``rules`` tests ``addr`` against (sorted, no repeats)."""
    names = {
        m.set_name
        for chain in rules.chains.values()
        for r in chain.rules
        for m in r.matches
        if isinstance(m, AddrIn) and m.addr is addr and m.family is rules.family
    }
    return sorted(names)


class Interpreter:
    """Symbolic evaluation of one family's loaded rules at one hook, for one local address."""

    def __init__(
        self,
        space: HeaderSpace,
        rules: FamilyRules,
        hook: HookName,
        pred_of: dict[str, int],
        local: int | None,
    ) -> None:
        self.space = space
        self.rules = rules
        self.family: Family = rules.family
        self.hook = hook
        self.peer = peer_field(hook)
        self.pred_of = pred_of  # peer-side set name -> predicate id of the address classes
        self.local = local
        self._deps: dict[str, frozenset[int]] = {}
        self._memo: dict[tuple[str, frozenset[int]], tuple[BDDNode, BDDNode]] = {}
        self._map_keys: dict[tuple[int, int, int], BDDNode] = {}

    # ---- dependencies ------------------------------------------------------------------
    def _targets(self, rule: Rule) -> list[str]:
        v = rule.verdict
        if v.kind in (Kind.JUMP, Kind.GOTO):
            return [v.target]
        if v.kind is Kind.VMAP:
            return [e.verdict.target for e in self.rules.maps[v.target] if e.verdict.kind in (Kind.JUMP, Kind.GOTO)]
        return []

    def deps(self, name: str, stack: tuple[str, ...] = ()) -> frozenset[int]:
        found = self._deps.get(name)
        if found is not None:
            return found
        if name in stack:
            raise UnmodelledConstructError(f"chain {name}", "a loop of jumps")
        chain = self._chain(name)
        out: set[int] = set()
        for r in chain.rules:
            for m in r.matches:
                if isinstance(m, AddrIn) and m.addr is self.peer and m.set_name in self.pred_of:
                    out.add(self.pred_of[m.set_name])
            for t in self._targets(r):
                out |= self.deps(t, (*stack, name))
        self._deps[name] = frozenset(out)
        return self._deps[name]

    def _chain(self, name: str) -> Chain:
        chain = self.rules.chains.get(name)
        if chain is None:
            raise UnmodelledConstructError(f"chain {name}", "missing")
        return chain

    # ---- matches -------------------------------------------------------------------------
    def _match(self, m: Match, sig: frozenset[int]) -> BDDNode | bool:
        sp = self.space
        if isinstance(m, FamilyIs):
            return m.family is self.family
        if isinstance(m, AddrIn):
            if m.family is not self.family:
                return False
            if m.addr is self.peer:
                inside = self.pred_of[m.set_name] in sig
            else:
                if self.local is None:
                    raise UnmodelledConstructError(f"set {m.set_name}", "a test of the host's own address (none known)")
                ranges = self.rules.sets[m.set_name].ranges
                i = bisect.bisect_right(ranges, (self.local, 1 << 129)) - 1
                inside = i >= 0 and ranges[i][0] <= self.local <= ranges[i][1]
            return inside != m.negate
        if isinstance(m, IntIn):
            u = sp.field_in(m.field, m.ranges)
            return ~u if m.negate else u
        if isinstance(m, TcpFlags):
            u = sp.tcp_flags(m.mask, m.value)
            return ~u if m.negate else u
        if isinstance(m, CtState):
            u = sp.ct_in(m.states)
            return ~u if m.negate else u
        if isinstance(m, Loopback):
            if m.side is not self.hook:  # no such interface at this hook: never "lo"
                return m.negate
            return ~sp.loopback if m.negate else sp.loopback
        if isinstance(m, InDynamicSet):
            return sp.in_dynamic(m.set_name)
        raise UnmodelledConstructError("rule", f"match {m!r}")  # pragma: no cover - Match is closed

    def _rule_match(self, rule: Rule, sig: frozenset[int]) -> BDDNode | None:
        u = self.space.true
        for m in rule.matches:
            r = self._match(m, sig)
            if r is False:
                return None
            if r is True:
                continue
            u = u & r
        return None if u == self.space.false else u

    # ---- chains ----------------------------------------------------------------------------
    def chain(self, name: str, sig: frozenset[int], stack: tuple[str, ...] = ()) -> tuple[BDDNode, BDDNode]:
        """(accepted, dropped) among the packets entering chain ``name``; the rest returns."""
        key = (name, sig & self.deps(name))
        found = self._memo.get(key)
        if found is not None:
            return found
        if name in stack:
            raise UnmodelledConstructError(f"chain {name}", "a loop of jumps")
        stack = (*stack, name)
        sp = self.space
        acc, drop, rest = sp.false, sp.false, sp.true
        for rule in self._chain(name).rules:
            if rest == sp.false:
                break
            m = self._rule_match(rule, sig)
            if m is None:
                continue
            if rule.verdict.kind is Kind.VMAP:
                for e in self.rules.maps[rule.verdict.target]:
                    em = m & self._map_key(e.proto, e.port_lo, e.port_hi)
                    acc, drop, rest = self._apply(e.verdict, em, acc, drop, rest, sig, stack)
            else:
                acc, drop, rest = self._apply(rule.verdict, m, acc, drop, rest, sig, stack)
        self._memo[key] = (acc, drop)
        return acc, drop

    def _map_key(self, proto: int, lo: int, hi: int) -> BDDNode:
        k = (proto, lo, hi)
        u = self._map_keys.get(k)
        if u is None:
            u = self.space.proto(proto) & self.space.field_in(Field.DPORT, ((lo, hi),))
            self._map_keys[k] = u
        return u

    def _apply(
        self,
        v: Verdict,
        m: BDDNode,
        acc: BDDNode,
        drop: BDDNode,
        rest: BDDNode,
        sig: frozenset[int],
        stack: tuple[str, ...],
    ) -> tuple[BDDNode, BDDNode, BDDNode]:
        here = rest & m
        if here == self.space.false or v.kind is Kind.CONTINUE:
            return acc, drop, rest
        if v.kind is Kind.ACCEPT:
            return acc | here, drop, rest & ~m
        if v.kind is Kind.DROP:
            return acc, drop | here, rest & ~m
        if v.kind is Kind.RETURN:
            return acc, drop, rest & ~m
        if v.kind in (Kind.JUMP, Kind.GOTO):
            a, d = self.chain(v.target, sig, stack)
            acc, drop = acc | (here & a), drop | (here & d)
            gone = m if v.kind is Kind.GOTO else m & (a | d)
            return acc, drop, rest & ~gone
        raise UnmodelledConstructError("rule", f"verdict {v.kind.value} here")

    def hook_accept(self, sig: frozenset[int]) -> BDDNode:
        """The packets every base chain of the hook accepts (policy included)."""
        sp = self.space
        out = sp.true
        for name in self.rules.hooks.get(self.hook, ()):
            acc, drop = self.chain(name, sig)
            policy = self._chain(name).policy
            passed = acc | (~(acc | drop) if policy is Kind.ACCEPT else sp.false)
            out = out & passed
        return out
