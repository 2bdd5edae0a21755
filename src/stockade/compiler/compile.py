"""The compiler: inventory + policy -> one HostPolicy per workload, kept up to date incrementally.

Design (see docs/architecture.md):

* Rules are compiled per distinct *label set*, not per host (Cilium's identity idea):
  hosts with the same labels share one rule tuple; only mode and own addresses differ.
* Every distinct peer selector is one address set named by a hash of its canonical form,
  so a peer joining or leaving changes set members and never rule text.
* ``upsert_workload`` / ``remove_workload`` re-evaluate only the peer sets whose selectors
  mention the changed workload's old or new labels (plus the few with no required label),
  and return per-host deltas: set elements added/removed, or a rules change.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from stockade.compiler.expand import EffectiveRule, expand_rules
from stockade.compiler.index import LabelIndex, SelectorIndex
from stockade.compiler.ir import AddressSet, Direction, HostDelta, HostPolicy, HostRule, SetDelta
from stockade.errors import NotFoundError
from stockade.model.addresses import AddressRanges, Family, Range, merge_ranges, ranges_to_networks
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.selectors import AllWorkloads, IPListSelector, LabelSelector, Selector
from stockade.model.workloads import Workload

LabelSet = frozenset[Label]


def set_name(sel: Selector) -> str:
    """Stable address-set name: a hash of the canonical selector (valid nft/ipset identifier)."""
    return "p" + hashlib.sha256(sel.canonical().encode()).hexdigest()[:12]


def _selects_workloads(sel: Selector) -> bool:
    return isinstance(sel, LabelSelector | AllWorkloads)


@dataclass(frozen=True)
class _LabelSetRules:
    rules: tuple[HostRule, ...]
    sets: tuple[str, ...]  # sorted names of the sets the rules reference


def _workload_ranges(w: Workload) -> tuple[tuple[Range, ...], tuple[Range, ...]]:
    v4 = [(int(a), int(a)) for a in w.addresses if a.version == 4]
    v6 = [(int(a), int(a)) for a in w.addresses if a.version == 6]
    return tuple(v4), tuple(v6)


class Compiler:
    """Incremental compiler. Construct with a Policy; read ``host_policy(name)``."""

    def __init__(self, policy: Policy) -> None:
        self._policy: Policy = policy
        self._policy_dirty: bool = False
        self._load(policy)

    # ---- construction ------------------------------------------------------
    @property
    def policy(self) -> Policy:
        """The current policy, inventory included (rebuilt lazily after workload changes)."""
        if self._policy_dirty:
            workloads = tuple(self._workloads[n] for n in sorted(self._workloads))
            self._policy = replace(self._policy, workloads=workloads)
            self._policy_dirty = False
        return self._policy

    def _load(self, policy: Policy) -> None:
        self._policy = policy
        self._policy_dirty = False
        self._groups = policy.group_map()
        self._iplists = policy.ip_list_map()
        self._rules: tuple[EffectiveRule, ...] = expand_rules(policy)
        self._sel_index = SelectorIndex(self._groups)
        self._provider_rules: dict[Selector, list[int]] = defaultdict(list)
        self._consumer_rules: dict[Selector, list[int]] = defaultdict(list)
        self._peers: dict[str, Selector] = {}
        for i, rule in enumerate(self._rules):
            for sel in rule.providers:
                self._peers[set_name(sel)] = sel
                if _selects_workloads(sel):
                    self._sel_index.add(sel)
                    self._provider_rules[sel].append(i)
            for sel in rule.consumers:
                self._peers[set_name(sel)] = sel
                if _selects_workloads(sel):
                    self._sel_index.add(sel)
                    self._consumer_rules[sel].append(i)
        self._selector_set: dict[Selector, str] = {sel: name for name, sel in self._peers.items()}

        self._workloads: dict[str, Workload] = {}
        self._ranges: dict[str, tuple[tuple[Range, ...], tuple[Range, ...]]] = {}
        self._labels = LabelIndex()
        for w in policy.workloads:
            self._workloads[w.name] = w
            self._ranges[w.name] = _workload_ranges(w)
            self._labels.add(w.name, w.labels)

        self._members: dict[str, set[str]] = {}
        self._member_of: dict[str, set[str]] = defaultdict(set)
        for name, sel in self._peers.items():
            members = self._labels.members(sel, self._groups)
            self._members[name] = members
            for m in members:
                self._member_of[m].add(name)
        self._set_cache: dict[str, tuple[AddressSet, AddressSet]] = {}
        self._ls_sets: dict[LabelSet, tuple[AddressSet, ...]] = {}
        self._ls_rules: dict[LabelSet, _LabelSetRules] = {}
        self._ls_hosts: dict[LabelSet, set[str]] = defaultdict(set)
        self._set_labelsets: dict[str, set[LabelSet]] = defaultdict(set)
        for w in policy.workloads:
            self._attach_host(w)

    def _attach_host(self, w: Workload) -> None:
        ls = w.labels
        if ls not in self._ls_rules:
            compiled = self._compile_labelset(ls)
            self._ls_rules[ls] = compiled
            for s in compiled.sets:
                self._set_labelsets[s].add(ls)
        self._ls_hosts[ls].add(w.name)

    def _detach_host(self, w: Workload) -> None:
        self._ls_hosts[w.labels].discard(w.name)

    # ---- per label set -------------------------------------------------------
    def _compile_labelset(self, labels: LabelSet) -> _LabelSetRules:
        matched = self._sel_index.matching(labels)
        inbound: set[int] = set()
        outbound: set[int] = set()
        for sel in matched:
            inbound.update(self._provider_rules.get(sel, ()))
            outbound.update(self._consumer_rules.get(sel, ()))
        rules: set[HostRule] = set()
        for i in inbound:
            r = self._rules[i]
            for c in r.consumers:
                rules.add(HostRule(r.action, Direction.INBOUND, r.rule_id, set_name(c), r.services))
        for i in outbound:
            r = self._rules[i]
            for p in r.providers:
                rules.add(HostRule(r.action, Direction.OUTBOUND, r.rule_id, set_name(p), r.services))
        ordered = tuple(sorted(rules))
        return _LabelSetRules(ordered, tuple(sorted({r.peer for r in ordered})))

    # ---- address sets ----------------------------------------------------------
    def _set_ranges(self, name: str) -> AddressRanges:
        sel = self._peers[name]
        if isinstance(sel, IPListSelector):
            iplist = self._iplists.get(sel.ip_list)
            return iplist.ranges() if iplist is not None else AddressRanges()
        v4: list[Range] = []
        v6: list[Range] = []
        for m in self._members[name]:
            r4, r6 = self._ranges[m]
            v4.extend(r4)
            v6.extend(r6)
        return AddressRanges(merge_ranges(v4), merge_ranges(v6))

    def address_sets(self, name: str) -> tuple[AddressSet, AddressSet]:
        cached = self._set_cache.get(name)
        if cached is None:
            ranges = self._set_ranges(name)
            canonical = self._peers[name].canonical()
            cached = (
                AddressSet(name, Family.V4, ranges_to_networks(ranges.v4, Family.V4), canonical),
                AddressSet(name, Family.V6, ranges_to_networks(ranges.v6, Family.V6), canonical),
            )
            self._set_cache[name] = cached
        return cached

    # ---- reading -----------------------------------------------------------------
    @property
    def workload_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._workloads))

    def host_policy(self, name: str) -> HostPolicy:
        w = self._workloads.get(name)
        if w is None:
            raise NotFoundError(f"no workload named {name!r}")
        compiled = self._ls_rules[w.labels]
        sets = self._ls_sets.get(w.labels)
        if sets is None:
            found: list[AddressSet] = []
            for s in compiled.sets:
                found.extend(self.address_sets(s))
            sets = tuple(sorted(found, key=_set_key))
            self._ls_sets[w.labels] = sets
        return HostPolicy(
            workload=w.name,
            mode=w.mode,
            local_addresses=w.addresses,
            rules=compiled.rules,
            sets=sets,
            failsafe=self._policy.failsafe,
        )

    def _invalidate_set(self, name: str) -> None:
        self._set_cache.pop(name, None)
        for ls in self._set_labelsets.get(name, ()):
            self._ls_sets.pop(ls, None)

    def all_host_policies(self) -> dict[str, HostPolicy]:
        return {n: self.host_policy(n) for n in self.workload_names}

    def rule_count(self, name: str) -> int:
        return len(self._ls_rules[self._workloads[name].labels].rules)

    # ---- incremental changes ---------------------------------------------------
    def upsert_workload(self, w: Workload) -> list[HostDelta]:
        """Add or replace one workload; returns the delta of every affected host."""
        old = self._workloads.get(w.name)
        was_in = set(self._member_of.get(w.name, set())) if old is not None else set()
        now_in = {self._selector_set[sel] for sel in self._sel_index.matching(w.labels)}
        if old is not None and old.addresses != w.addresses:
            touched = was_in | now_in  # every set holding the workload changes members
        else:
            touched = was_in ^ now_in  # only sets it joins or leaves
        before = {s: self.address_sets(s) for s in touched}
        old_policy = self.host_policy(w.name) if old is not None else None

        if old is not None:
            self._detach_host(old)
            self._labels.remove(w.name)
        self._workloads[w.name] = w
        self._ranges[w.name] = _workload_ranges(w)
        self._labels.add(w.name, w.labels)
        self._attach_host(w)
        for s in was_in - now_in:
            self._members[s].discard(w.name)
        for s in now_in:
            self._members[s].add(w.name)
        self._member_of[w.name] = now_in
        for s in before:
            self._invalidate_set(s)
        self._policy_dirty = True
        return self._deltas(before, {w.name: old_policy}, changed_host=w.name)

    def remove_workload(self, name: str) -> list[HostDelta]:
        old = self._workloads.get(name)
        if old is None:
            raise NotFoundError(f"no workload named {name!r}")
        sets = set(self._member_of.get(name, set()))
        before = {s: self.address_sets(s) for s in sets}
        self._detach_host(old)
        self._labels.remove(name)
        del self._workloads[name]
        del self._ranges[name]
        for s in sets:
            self._members[s].discard(name)
            self._invalidate_set(s)
        self._member_of.pop(name, None)
        self._policy_dirty = True
        deltas = self._deltas(before, {}, changed_host=None)
        deltas.append(HostDelta(name, None, True, ()))
        return sorted(deltas, key=lambda d: d.workload)

    def replace_policy(self, policy: Policy) -> list[HostDelta]:
        """Swap in a new policy (rules, IP lists, services, inventory); diff every host."""
        old_policies = self.all_host_policies()
        self._load(policy)
        new_policies = self.all_host_policies()
        deltas: list[HostDelta] = []
        for name in sorted(set(old_policies) | set(new_policies)):
            old_hp = old_policies.get(name)
            new_hp = new_policies.get(name)
            if new_hp is None:
                deltas.append(HostDelta(name, None, True, ()))
            elif old_hp is None or old_hp.rules_key() != new_hp.rules_key():
                deltas.append(HostDelta(name, new_hp, True, ()))
            elif old_hp != new_hp:
                deltas.append(HostDelta(name, new_hp, False, diff_sets(old_hp.sets, new_hp.sets)))
        return deltas

    # ---- helpers -------------------------------------------------------------------
    def _deltas(
        self,
        before: dict[str, tuple[AddressSet, AddressSet]],
        old_policies: dict[str, HostPolicy | None],
        changed_host: str | None,
    ) -> list[HostDelta]:
        set_deltas: dict[str, list[SetDelta]] = {}
        for s, old_sets in before.items():
            new_sets = self.address_sets(s)
            found = diff_sets(old_sets, new_sets)
            if found:
                set_deltas[s] = list(found)
        labelsets: set[LabelSet] = set()
        for s in set_deltas:
            labelsets |= self._set_labelsets.get(s, set())
        hosts: list[tuple[str, LabelSet]] = [(h, ls) for ls in labelsets for h in self._ls_hosts.get(ls, ())]
        if changed_host is not None and changed_host not in {h for h, _ in hosts}:
            hosts.append((changed_host, self._workloads[changed_host].labels))
        per_labelset: dict[LabelSet, tuple[SetDelta, ...]] = {}
        out: list[HostDelta] = []
        for h, ls in sorted(hosts, key=lambda item: item[0]):
            hp = self.host_policy(h)
            if h in old_policies:
                old_hp = old_policies[h]
                if old_hp is None or old_hp.rules_key() != hp.rules_key():
                    out.append(HostDelta(h, hp, True, ()))
                    continue
            deltas = per_labelset.get(ls)
            if deltas is None:
                deltas = tuple(d for s in self._ls_rules[ls].sets for d in set_deltas.get(s, ()))
                per_labelset[ls] = deltas
            if deltas or (h in old_policies and old_policies[h] != hp):
                out.append(HostDelta(h, hp, False, deltas))
        return out


def _set_key(s: AddressSet) -> tuple[str, int]:
    return s.name, s.family.value


def diff_sets(old: tuple[AddressSet, ...], new: tuple[AddressSet, ...]) -> tuple[SetDelta, ...]:
    """Element changes turning ``old`` sets into ``new`` ones (same names and families)."""
    old_by = {(s.name, s.family): set(s.members) for s in old}
    out: list[SetDelta] = []
    for s in new:
        prev = old_by.get((s.name, s.family), set())
        cur = set(s.members)
        if prev != cur:
            out.append(
                SetDelta(
                    s.name,
                    s.family,
                    tuple(sorted(cur - prev, key=_net_key)),
                    tuple(sorted(prev - cur, key=_net_key)),
                )
            )
    return tuple(sorted(out))


def _net_key(n: IPv4Network | IPv6Network) -> tuple[int, int]:
    return int(n.network_address), n.prefixlen


def compile_policy(policy: Policy) -> dict[str, HostPolicy]:
    """HostPolicy of every workload, by name."""
    return Compiler(policy).all_host_policies()


def compile_host(policy: Policy, workload: str) -> HostPolicy:
    return Compiler(policy).host_policy(workload)
