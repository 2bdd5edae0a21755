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
  (a drop anywhere is final; an accept only ends that chain);
* encrypted rules (:mod:`.tunnel`): a ``mark`` verdict steers the packets it reaches into the
  tunnel and goes on with the next rule; at the output hook the accepted packets become the
  three-valued outcome (drop, clear, tunnel) by the read-back's steering.

A chain's result depends on the address class only through the sets it (transitively) tests,
so results are memoised per (chain, those sets' membership): a verdict chain is computed once,
a port-group chain once per combination of its peers.

What a single rule matches (its BDDs, split into the peer's set tests and the rest, memoised
by the read objects) is :mod:`.rulematch`'s; this module is the walk over chains and verdicts.
"""

from __future__ import annotations

from itertools import pairwise

from stockade.errors import UnmodelledConstructError
from stockade.verify.loaded import (
    AddrIn,
    Chain,
    FamilyRules,
    HookName,
    Kind,
    MapElement,
    Rule,
    Steering,
    Verdict,
)
from stockade.verify.rulematch import UNSEEN, UNSEEN_SPLIT, RuleMatcher, peer_field
from stockade.verify.rulescan import RuleScan, scan_rules
from stockade.verify.space import BDDNode, HeaderSpace, disjoin, grouped_or
from stockade.verify.tunnel import bind_marks, output_exit

# verdicts after which a packet never comes back to the rules that follow: consecutive rules
# with one of them (and the same target) can be merged into one rule matching their OR
_MERGEABLE = frozenset({Kind.ACCEPT, Kind.DROP, Kind.RETURN, Kind.GOTO})
_DECIDES = frozenset({*_MERGEABLE, Kind.JUMP})  # blocks (a jump: only without marks)
_NOTHING = "nothing"  # a rule that changes nothing: a jump to a chain returning every packet
_State = tuple[BDDNode, BDDNode, BDDNode]  # (accepted, dropped, marked) of a chain so far
_Block = tuple[BDDNode, BDDNode, BDDNode, BDDNode]  # (matched, accepted, dropped, marked) of rules


def _deciding(elements: tuple[MapElement, ...]) -> bool:
    return all(e.verdict.kind in _DECIDES for e in elements)


def _disjoint(elements: tuple[MapElement, ...]) -> bool:
    """Whether no two elements of a verdict map share a key (``l4proto . dport``)."""
    keys = sorted((e.proto, e.port_lo, e.port_hi) for e in elements)
    return all(p1 != p2 or hi1 < lo2 for (p1, _lo1, hi1), (p2, lo2, _hi2) in pairwise(keys))


class Interpreter:
    """Symbolic evaluation of one family's loaded rules at one hook, for one local address."""

    matcher_type: type[RuleMatcher] = RuleMatcher  # what rules match (tests swap in unmemoised ones)

    def __init__(
        self,
        space: HeaderSpace,
        rules: FamilyRules,
        hook: HookName,
        pred_of: dict[str, int],
        local: int | None,
        members: dict[int, BDDNode] | None = None,
        steering: Steering = Steering.ROUTE,
        scan: RuleScan | None = None,
    ) -> None:
        self.space = space
        self._marks_used = (scan if scan is not None else scan_rules(rules)).uses_marks
        self.rules = rules
        self.hook = hook
        self.peer = peer_field(hook)
        self.pred_of = pred_of  # peer-side set name -> predicate id of the address classes
        self.local = local
        self.members = members  # symbolic membership (:mod:`.members`), else None: per class
        self.matcher = self.matcher_type(space, rules, hook, pred_of, local, members)
        self.steering = steering
        self._marks: dict[tuple[str, frozenset[int]], BDDNode] = {}  # packets a chain steers (MARK)
        self._deps: dict[str, frozenset[int]] = {}
        self._memo: dict[tuple[str, frozenset[int]], tuple[BDDNode, BDDNode]] = {}
        self._splits: dict[int, tuple[BDDNode, BDDNode] | None] = {}  # id(rule): the rules outlive us
        # a goto's / jump's target as a merge key, by (id(kind), target): a Verdict's own hash
        # goes through the Enum's Python-level __hash__, once per rule (160k rules)
        self._outcomes: dict[tuple[int, str], object] = {}
        # a verdict's outcome by id (the read-backs share verdict objects; the rules holding
        # them outlive us): :meth:`_outcome` is the same for every rule holding the verdict
        self._outcome_of: dict[int, object] = {}
        self._rule_index: dict[str, tuple[list[int], dict[int, list[int]]]] = {}
        self._map_index: dict[str, tuple[list[int], dict[int, list[int]]]] = {}

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
    # ---- chains ----------------------------------------------------------------------------
    def chain(self, name: str, sig: frozenset[int], stack: tuple[str, ...] = ()) -> tuple[BDDNode, BDDNode]:
        """(accepted, dropped) among the packets entering chain ``name``; the rest returns."""
        if self.members is not None:
            return self._chain_symbolic(name, stack)
        key = (name, sig & self.deps(name))
        found = self._memo.get(key)
        if found is not None:
            return found
        if name in stack:
            raise UnmodelledConstructError(f"chain {name}", "a loop of jumps")
        stack = (*stack, name)
        sp = self.space
        acc, drop, rest = sp.false, sp.false, sp.true
        marks = [sp.false] if self._uses_marks() else None  # packets this chain steers (MARK)
        rules = self._chain(name).rules
        for index in self._relevant(name, sig):
            rule = rules[index]
            if rest == sp.false:
                break
            m = self.matcher.class_match(rule, sig)
            if m is None:
                continue
            if rule.verdict.kind is Kind.VMAP:
                elements = self.rules.maps[rule.verdict.target]
                for j in self._relevant_elements(rule.verdict.target, sig, stack):
                    e = elements[j]
                    em = m & self.matcher.map_key(e.proto, e.port_lo, e.port_hi)
                    acc, drop, rest = self._apply(e.verdict, em, acc, drop, rest, sig, stack, marks)
            else:
                acc, drop, rest = self._apply(rule.verdict, m, acc, drop, rest, sig, stack, marks)
        self._memo[key] = (acc, drop)
        if marks is not None:
            self._marks[key] = marks[0]
        return acc, drop

    def _chain_symbolic(self, name: str, stack: tuple[str, ...]) -> tuple[BDDNode, BDDNode]:
        """The same (accepted, dropped) with set membership symbolic.

        Rules that decide every packet they match (accept, drop, return, goto; a jump too, as
        the packets its chain decides, when no rule marks packets) are *blocks* ``(matched,
        accepted, dropped, marked)``; consecutive ones are merged pairwise in a balanced tree,
        the first one winning where it matches (``M = M1 | M2``, each outcome ``X1 | (X2 &
        ~M1)``), so each of the log(n) levels costs about the size of its result, where a
        rule-by-rule build onto everything decided so far costs that much per rule (session 6:
        ``ite(match, verdict, after)`` from the last rule up). A verdict map's elements (disjoint
        keys) are blocks of their own. Jumps with marks and ``mark`` rules end a run of blocks
        and are applied one by one.

        Consecutive rules with the same outcome (accept, drop, return, goto X; a goto or jump to
        a chain that accepts or drops every packet counts as that; rules without a verdict in
        between decide nothing) are one block whose match is the OR of theirs: the first of them
        that matches gives the outcome the others would. Equal non-address matches are factored
        out (``ports and (in A or in B ...)``), so a run of ``-p tcp --dport 80 -m set
        --match-set Pi src -j DROP`` costs one step, not one per set."""
        found = self._memo.get((name, frozenset()))
        if found is not None:
            return found
        if name in stack:
            raise UnmodelledConstructError(f"chain {name}", "a loop of jumps")
        stack = (*stack, name)
        sp = self.space
        false = sp.false
        marks = self._uses_marks()  # then also which packets the chain steers (MARK), as a third BDD
        steps: list[tuple[object, Verdict, list[tuple[BDDNode, BDDNode]]]] = []  # (outcome, verdict, parts)
        splits = self._splits
        outcomes = self._outcome_of
        # the loop runs once per rule (160k per family for nftables at 1,000 policy rules):
        # a rule's split and a verdict's outcome are found by object, one lookup each
        for rule in self._chain(name).rules:
            verdict = rule.verdict
            if verdict.kind is Kind.CONTINUE:  # a rule without a verdict decides nothing: never split
                continue
            key = id(rule)  # equal rules of several chains are one object (nftables read-back)
            split = splits.get(key, UNSEEN_SPLIT)
            if split is UNSEEN_SPLIT:
                split = splits[key] = self.matcher.split_symbolic(rule)
            if split is None:
                continue
            outcome = outcomes.get(id(verdict), UNSEEN)
            if outcome is UNSEEN:
                outcome = outcomes[id(verdict)] = self._outcome(verdict, stack, marks)
            if outcome is _NOTHING:
                continue
            if outcome is not None and steps and steps[-1][0] == outcome:
                steps[-1][2].append(split)
                continue
            steps.append((outcome, verdict, [split]))
        state: _State = (false, false, false)  # (accepted, dropped, marked); the end returns
        pending: list[_Block] = []  # blocks, the LAST rule first
        for outcome, v, parts in reversed(steps):
            m = grouped_or(sp, parts) if len(parts) > 1 else parts[0][0] & parts[0][1]
            if m == false:
                continue
            if outcome == "accept":
                pending.append((m, m, false, false))
            elif outcome == "drop":
                pending.append((m, false, m, false))
            elif outcome == "return":
                pending.append((m, false, false, false))
            elif v.kind is Kind.GOTO or (v.kind is Kind.JUMP and not marks):
                pending.append(self._block(v, m, stack, marks))
            elif v.kind is Kind.VMAP and not marks and _deciding(elements := self.rules.maps[v.target]):
                blocks = [self._block(e.verdict, em, stack, marks) for e in reversed(elements)
                          if (em := m & self.matcher.map_key(e.proto, e.port_lo, e.port_hi)) != false]
                if _disjoint(elements):  # the map is one block, the ORs of its elements' blocks
                    m, a, d, k = (disjoin(sp, [b[i] for b in blocks]) for i in range(4))
                    pending.append((m, a, d, k))
                else:  # the first element holding the key decides
                    pending.extend(blocks)
            else:  # a mark; a jump or a verdict map while marks are tracked: one by one
                state = self._flush(pending, state, marks)
                pending = []
                if v.kind is Kind.VMAP:
                    after = state  # a jump's returns go on with the next RULE, not element
                    for e in reversed(self.rules.maps[v.target]):
                        em = m & self.matcher.map_key(e.proto, e.port_lo, e.port_hi)
                        if em != false:
                            state = self._ite(e.verdict, em, state, after, stack, marks)
                else:
                    state = self._ite(v, m, state, state, stack, marks)
        acc, drop, marked = self._flush(pending, state, marks)
        self._memo[(name, frozenset())] = (acc, drop)
        if marks:
            self._marks[(name, frozenset())] = marked
        return acc, drop

    def _outcome(self, v: Verdict, stack: tuple[str, ...], marks: bool) -> object:
        """What a rule with verdict ``v`` does to every packet it matches, for merging runs:
        "accept", "drop", "return", ("goto", X); a goto or jump to a chain that accepts (drops)
        every packet is "accept" ("drop"); a jump to one that returns every packet does nothing
        (:data:`_NOTHING`) when no rule marks packets; None: not merged."""
        kind = v.kind
        if kind is Kind.ACCEPT:
            return "accept"
        if kind is Kind.DROP:
            return "drop"
        if kind is Kind.RETURN:
            return "return"
        if kind not in (Kind.GOTO, Kind.JUMP):
            return None
        if marks:
            return ("goto", v.target) if kind is Kind.GOTO else None
        key = (id(kind), v.target)
        found = self._outcomes.get(key)
        if found is None:
            sp = self.space
            a, d = self._chain_symbolic(v.target, stack)
            if a == sp.true:
                found = "accept"
            elif d == sp.true:
                found = "drop"
            elif a == sp.false and d == sp.false:
                found = "return" if kind is Kind.GOTO else _NOTHING
            else:
                found = (kind.value, v.target) if kind is Kind.GOTO else ("jump", v.target, len(self._outcomes))
            self._outcomes[key] = found
        return found

    def _block(self, v: Verdict, m: BDDNode, stack: tuple[str, ...], marks: bool) -> _Block:
        """(matched, accepted, dropped, marked) of a rule that decides what it matches: accept,
        drop, return, goto X; jump X (only without marks): the packets X decides."""
        false = self.space.false
        if v.kind is Kind.ACCEPT:
            return m, m, false, false
        if v.kind is Kind.DROP:
            return m, false, m, false
        if v.kind is Kind.RETURN:
            return m, false, false, false
        a, d = self._chain_symbolic(v.target, stack)
        k = m & self._marks[(v.target, frozenset())] if marks else false
        if v.kind is Kind.JUMP:  # what X returns goes on with the next rule: not matched here
            return m & (a | d), m & a, m & d, k
        return m, m & a, m & d, k

    def _flush(self, pending: list[_Block], state: _State, marks: bool) -> _State:
        """``state`` after the blocks ``pending`` (the last rule first) in front of it, merged
        in a balanced tree (see :meth:`_chain_symbolic`)."""
        if not pending:
            return state
        false = self.space.false
        ite = self.space.bdd.ite  # ``X1 | (X2 & ~M1)`` is ``ite(M1, X1, X2)``: a block's outcomes lie within its match
        level = pending[::-1]
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level) - 1, 2):
                (m1, a1, d1, k1), (m2, a2, d2, k2) = level[i], level[i + 1]
                nxt.append((
                    m1 | m2,
                    a1 if a2 == false else ite(m1, a1, a2),
                    d1 if d2 == false else ite(m1, d1, d2),
                    ite(m1, k1, k2) if marks else k1,
                ))
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        m, a, d, k = level[0]
        acc, drop, marked = state
        if acc == false and drop == false and marked == false:
            return a, d, k
        keep = ~m
        return a | (acc & keep), d | (drop & keep), (k | (marked & keep)) if marks else marked

    def _ite(
        self,
        v: Verdict,
        m: BDDNode,
        state: tuple[BDDNode, BDDNode, BDDNode],
        after: tuple[BDDNode, BDDNode, BDDNode],
        stack: tuple[str, ...],
        marks: bool,
    ) -> tuple[BDDNode, BDDNode, BDDNode]:
        """Packets matching ``m`` get verdict ``v``; the others keep ``state`` (accepted, dropped,
        marked). ``after``: what the rules after this one decide, for those a jump returns."""
        sp = self.space
        ite = sp.bdd.ite
        acc, drop, marked = state
        if v.kind is Kind.MARK:  # steered into the tunnel; the next rule runs
            if self.hook is not HookName.OUTPUT or not marks:
                raise UnmodelledConstructError("rule", f"the steering mark set at the {self.hook.value} hook")
            return acc, drop, marked | m
        if v.kind in (Kind.ACCEPT, Kind.DROP, Kind.RETURN):
            if marks:
                marked = marked & ~m
            if v.kind is Kind.ACCEPT:
                return acc | m, drop & ~m, marked
            if v.kind is Kind.DROP:
                return acc & ~m, drop | m, marked
            return acc & ~m, drop & ~m, marked
        if v.kind in (Kind.JUMP, Kind.GOTO):
            a, d = self._chain_symbolic(v.target, stack)
            acc, drop = ite(m, a, acc), ite(m, d, drop)
            if marks:
                marked = ite(m, self._marks[(v.target, frozenset())], marked)
            if v.kind is Kind.JUMP:  # what X returns goes on with the rules after this one
                back = m & ~(a | d)  # small: within this rule's match (``after`` is not)
                acc, drop = acc | (back & after[0]), drop | (back & after[1])
                if marks:
                    marked = marked | (back & after[2])
            return acc, drop, marked
        raise UnmodelledConstructError("rule", f"verdict {v.kind.value} here")

    # ---- which rules can matter for an address class --------------------------------------
    def _relevant(self, name: str, sig: frozenset[int]) -> list[int]:
        """Indices of the rules of ``name`` that can match a peer in ``sig``, in order: a rule
        testing the peer against a set (not negated) matters only when the class is in it, a
        rule that matches no packet of this family and hook never."""
        index = self._rule_index.get(name)
        if index is None:
            uncond: list[int] = []
            by_pred: dict[int, list[int]] = {}
            for i, rule in enumerate(self._chain(name).rules):
                static, tests = self.matcher.class_split(rule)
                if static is None:  # never matches here (another family's set, ...): skipped
                    continue
                pred = next((p for p, negate in tests if not negate), None)
                if pred is None:
                    uncond.append(i)
                else:
                    by_pred.setdefault(pred, []).append(i)
            index = (uncond, by_pred)
            self._rule_index[name] = index
        uncond, by_pred = index
        if not by_pred:
            return uncond
        picked = set(uncond)
        for p in sig:
            picked.update(by_pred.get(p, ()))
        return sorted(picked)

    def _relevant_elements(self, map_name: str, sig: frozenset[int], stack: tuple[str, ...]) -> list[int]:
        """Indices of the elements of a verdict map that can decide something for ``sig``: a
        ``jump`` to a chain that decides nothing without the class's sets is skipped."""
        index = self._map_index.get(map_name)
        if index is None:
            uncond: list[int] = []
            by_pred: dict[int, list[int]] = {}
            sp = self.space
            for i, e in enumerate(self.rules.maps[map_name]):
                if e.verdict.kind is not Kind.JUMP:
                    uncond.append(i)
                    continue
                a, d = self.chain(e.verdict.target, frozenset(), stack)
                deps = self.deps(e.verdict.target)
                if a != sp.false or d != sp.false or not deps:
                    uncond.append(i)
                else:
                    for p in deps:
                        by_pred.setdefault(p, []).append(i)
            index = (uncond, by_pred)
            self._map_index[map_name] = index
        uncond, by_pred = index
        picked = set(uncond)
        for p in sig:
            picked.update(by_pred.get(p, ()))
        return sorted(picked)

    def _apply(
        self,
        v: Verdict,
        m: BDDNode,
        acc: BDDNode,
        drop: BDDNode,
        rest: BDDNode,
        sig: frozenset[int],
        stack: tuple[str, ...],
        marks: list[BDDNode] | None = None,
    ) -> tuple[BDDNode, BDDNode, BDDNode]:
        here = rest & m
        if here == self.space.false or v.kind is Kind.CONTINUE:
            return acc, drop, rest
        if v.kind is Kind.MARK:  # steered into the tunnel; the next rule runs
            if self.hook is not HookName.OUTPUT or marks is None:  # (marks: None only without MARK rules)
                raise UnmodelledConstructError("rule", f"the steering mark set at the {self.hook.value} hook")
            marks[0] = marks[0] | here
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
            if marks is not None:
                marks[0] = marks[0] | (here & self._marks[(v.target, sig & self.deps(v.target))])
            gone = m if v.kind is Kind.GOTO else m & (a | d)
            return acc, drop, rest & ~gone
        raise UnmodelledConstructError("rule", f"verdict {v.kind.value} here")

    def hook_accept(self, sig: frozenset[int]) -> BDDNode:
        """The packets every base chain of the hook accepts (policy included)."""
        sp = self.space
        out = sp.true
        marked = sp.false
        uses_marks = self._uses_marks()
        for name in self.rules.hooks.get(self.hook, ()):
            acc, drop = self.chain(name, sig)
            policy = self._chain(name).policy
            passed = acc | (~(acc | drop) if policy is Kind.ACCEPT else sp.false)
            if uses_marks:  # what this base chain steers, of the packets that reached it
                marked = marked | (out & self._marks[(name, sig & self.deps(name))])
            out = out & passed
        if self.hook is not HookName.OUTPUT:
            return out
        if uses_marks:
            out, marked = bind_marks(sp, out, marked)
        return output_exit(sp, out, marked, self.steering)

    def _uses_marks(self) -> bool:
        """Whether any rule tests or sets the packet mark (else ``mk`` never appears: no binding)."""
        return self._marks_used
