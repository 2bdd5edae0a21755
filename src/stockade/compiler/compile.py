"""The compiler: inventory + policy -> one HostPolicy per workload, kept up to date incrementally.

Design (see docs/architecture.md):

* Rules are compiled per distinct *relevant label set*, not per host (Cilium's identity idea):
  only labels some selector mentions can change which rules apply, so hosts whose mentioned
  labels are equal share one rule tuple; mode and own addresses are the only per-host parts.
* Every distinct peer selector is one address set named by a hash of its canonical form,
  so a peer joining or leaving changes set members and never rule text.
* ``upsert_workload`` / ``remove_workload`` find the sets the workload leaves or joins through
  the selector index (never a scan of all selectors), update them one address at a time
  (``MemberSet``), and return per-host deltas: set elements added/removed, or a rules change.
"""

from __future__ import annotations

import gc
import hashlib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network

from stockade.compiler.delta import diff_sets
from stockade.compiler.expand import EffectiveRule, expand_rules
from stockade.compiler.index import LabelIndex, SelectorIndex
from stockade.compiler.ir import AddressSet, Direction, HostDelta, HostPolicy, HostRule, SetDelta
from stockade.compiler.members import MemberSet
from stockade.errors import NotFoundError
from stockade.model.addresses import Family, IPNetwork
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


@contextmanager
def _bulk_allocation() -> Iterator[None]:
    """Pause the cyclic GC while building large acyclic structures (it was ~45% of a full compile)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class _LabelSetRules:
    rules: tuple[HostRule, ...]
    sets: tuple[str, ...]  # sorted names of the sets the rules reference


def _ints(w: Workload, version: int) -> list[int]:
    return [int(a) for a in w.addresses if a.version == version]


class _DeltaBuilder:
    """Accumulates CIDR additions/removals per set and family, cancelling opposites."""

    def __init__(self) -> None:
        self.added: dict[tuple[str, Family], set[IPNetwork]] = defaultdict(set)
        self.removed: dict[tuple[str, Family], set[IPNetwork]] = defaultdict(set)

    def record(self, key: tuple[str, Family], added: set[IPNetwork], removed: set[IPNetwork]) -> None:
        for n in removed:
            if n in self.added[key]:
                self.added[key].discard(n)
            else:
                self.removed[key].add(n)
        for n in added:
            if n in self.removed[key]:
                self.removed[key].discard(n)
            else:
                self.added[key].add(n)

    def by_set(self) -> dict[str, tuple[SetDelta, ...]]:
        out: dict[str, list[SetDelta]] = defaultdict(list)
        for key in sorted(set(self.added) | set(self.removed), key=lambda k: (k[0], k[1].value)):
            add, rem = self.added.get(key, set()), self.removed.get(key, set())
            if add or rem:
                out[key[0]].append(
                    SetDelta(key[0], key[1], tuple(sorted(add, key=_net_key)), tuple(sorted(rem, key=_net_key)))
                )
        return {k: tuple(v) for k, v in out.items()}


class Compiler:
    """Incremental compiler. Construct with a Policy; read ``host_policy(name)``."""

    def __init__(self, policy: Policy) -> None:
        self._policy: Policy = policy
        self._policy_dirty: bool = False
        with _bulk_allocation():
            self._load(policy)

    @property
    def policy(self) -> Policy:
        """The current policy, inventory included (rebuilt lazily after workload changes)."""
        if self._policy_dirty:
            workloads = tuple(self._workloads[n] for n in sorted(self._workloads))
            self._policy = replace(self._policy, workloads=workloads)
            self._policy_dirty = False
        return self._policy

    # ---- construction ------------------------------------------------------
    def _load(self, policy: Policy) -> None:
        self._policy = policy
        self._policy_dirty = False
        self._groups = policy.group_map()
        self._rules: tuple[EffectiveRule, ...] = expand_rules(policy)
        self._sel_index = SelectorIndex(self._groups)
        self._provider_rules: dict[Selector, list[int]] = defaultdict(list)
        self._consumer_rules: dict[Selector, list[int]] = defaultdict(list)
        self._name_of: dict[Selector, str] = {}
        for i, rule in enumerate(self._rules):
            for side, sels in ((self._provider_rules, rule.providers), (self._consumer_rules, rule.consumers)):
                for sel in sels:
                    if sel not in self._name_of:
                        self._name_of[sel] = set_name(sel)
                    if _selects_workloads(sel):
                        self._sel_index.add(sel)
                        side[sel].append(i)
        self._peers: dict[str, Selector] = {name: sel for sel, name in self._name_of.items()}
        relevant: set[Label] = set()
        for sel in self._name_of:
            if isinstance(sel, LabelSelector):
                relevant.update(sel.mentioned_labels(self._groups))
        self._relevant: frozenset[Label] = frozenset(relevant)

        self._workloads: dict[str, Workload] = {}
        self._key_of: dict[str, LabelSet] = {}
        self._labels = LabelIndex()
        for w in policy.workloads:
            self._workloads[w.name] = w
            self._labels.add(w.name, w.labels)

        # address sets: IP lists are static, workload sets are MemberSets
        iplists = policy.ip_list_map()
        self._static: dict[str, tuple[AddressSet, AddressSet]] = {}
        self._member_sets: dict[str, tuple[MemberSet, MemberSet]] = {}
        self._member_of: dict[str, set[str]] = defaultdict(set)
        for name, sel in self._peers.items():
            canonical = sel.canonical()
            if isinstance(sel, IPListSelector):
                iplist = iplists.get(sel.ip_list)
                if iplist is None:
                    raise NotFoundError(f"unknown IP list {sel.ip_list!r}")
                ranges = iplist.ranges()
                self._static[name] = (
                    AddressSet(name, Family.V4, ranges.networks(Family.V4), canonical),
                    AddressSet(name, Family.V6, ranges.networks(Family.V6), canonical),
                )
                continue
            members = self._labels.members(sel, self._groups)
            v4: list[int] = []
            v6: list[int] = []
            for m in members:
                self._member_of[m].add(name)
                v4.extend(_ints(self._workloads[m], 4))
                v6.extend(_ints(self._workloads[m], 6))
            self._member_sets[name] = (MemberSet(Family.V4, v4), MemberSet(Family.V6, v6))

        self._set_cache: dict[str, tuple[AddressSet, AddressSet]] = {}
        self._ls_sets: dict[LabelSet, tuple[AddressSet, ...]] = {}
        self._ls_rules: dict[LabelSet, _LabelSetRules] = {}
        self._ls_hosts: dict[LabelSet, set[str]] = defaultdict(set)
        self._set_labelsets: dict[str, set[LabelSet]] = defaultdict(set)
        for w in policy.workloads:
            self._attach_host(w)

    def _key(self, w: Workload) -> LabelSet:
        return w.labels & self._relevant

    def _attach_host(self, w: Workload) -> None:
        ls = self._key(w)
        self._key_of[w.name] = ls
        if ls not in self._ls_rules:
            compiled = self._compile_labelset(ls)
            self._ls_rules[ls] = compiled
            for s in compiled.sets:
                self._set_labelsets[s].add(ls)
        self._ls_hosts[ls].add(w.name)

    def _detach_host(self, name: str) -> None:
        ls = self._key_of.pop(name)
        self._ls_hosts[ls].discard(name)

    # ---- per label set -------------------------------------------------------
    def _compile_labelset(self, labels: LabelSet) -> _LabelSetRules:
        matched = self._sel_index.matching(labels)
        inbound: set[int] = set()
        outbound: set[int] = set()
        for sel in matched:
            inbound.update(self._provider_rules.get(sel, ()))
            outbound.update(self._consumer_rules.get(sel, ()))
        rules: set[HostRule] = set()
        names = self._name_of
        for i in inbound:
            r = self._rules[i]
            for c in r.consumers:
                rules.add(HostRule(r.action, Direction.INBOUND, r.rule_id, names[c], r.services))
        for i in outbound:
            r = self._rules[i]
            for p in r.providers:
                rules.add(HostRule(r.action, Direction.OUTBOUND, r.rule_id, names[p], r.services))
        ordered = tuple(sorted(rules))
        return _LabelSetRules(ordered, tuple(sorted({r.peer for r in ordered})))

    # ---- address sets ----------------------------------------------------------
    def address_sets(self, name: str) -> tuple[AddressSet, AddressSet]:
        static = self._static.get(name)
        if static is not None:
            return static
        cached = self._set_cache.get(name)
        if cached is None:
            v4, v6 = self._member_sets[name]
            canonical = self._peers[name].canonical()
            cached = (
                AddressSet(name, Family.V4, v4.networks(), canonical),
                AddressSet(name, Family.V6, v6.networks(), canonical),
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
        ls = self._key_of[name]
        compiled = self._ls_rules[ls]
        sets = self._ls_sets.get(ls)
        if sets is None:
            found: list[AddressSet] = []
            for s in compiled.sets:
                found.extend(self.address_sets(s))
            sets = tuple(sorted(found, key=_set_key))
            self._ls_sets[ls] = sets
        return HostPolicy(
            workload=w.name,
            mode=w.mode,
            local_addresses=w.addresses,
            rules=compiled.rules,
            sets=sets,
            failsafe=self._policy.failsafe,
        )

    def all_host_policies(self) -> dict[str, HostPolicy]:
        with _bulk_allocation():
            return {n: self.host_policy(n) for n in self.workload_names}

    def rule_count(self, name: str) -> int:
        return len(self._ls_rules[self._key_of[name]].rules)

    # ---- incremental changes ---------------------------------------------------
    def _change_members(self, builder: _DeltaBuilder, s: str, w: Workload, add: bool, only: set[int] | None) -> None:
        for ms, version in zip(self._member_sets[s], (4, 6), strict=True):
            for a in _ints(w, version):
                if only is not None and a not in only:
                    continue
                added, removed = ms.add(a) if add else ms.remove(a)
                if added or removed:
                    builder.record((s, ms.family), added, removed)

    def _invalidate_set(self, name: str) -> None:
        self._set_cache.pop(name, None)
        for ls in self._set_labelsets.get(name, ()):
            self._ls_sets.pop(ls, None)

    def upsert_workload(self, w: Workload) -> list[HostDelta]:
        """Add or replace one workload; returns the delta of every affected host."""
        old = self._workloads.get(w.name)
        old_policy = self.host_policy(w.name) if old is not None else None
        was_in = set(self._member_of.get(w.name, set())) if old is not None else set()
        now_in = {self._name_of[sel] for sel in self._sel_index.matching(w.labels)}
        builder = _DeltaBuilder()
        for s in was_in - now_in:
            assert old is not None
            self._change_members(builder, s, old, add=False, only=None)
        for s in now_in - was_in:
            self._change_members(builder, s, w, add=True, only=None)
        if old is not None and old.addresses != w.addresses:
            old_ints = {int(a) for a in old.addresses}
            new_ints = {int(a) for a in w.addresses}
            for s in was_in & now_in:
                self._change_members(builder, s, old, add=False, only=old_ints - new_ints)
                self._change_members(builder, s, w, add=True, only=new_ints - old_ints)
        set_deltas = builder.by_set()
        for s in set_deltas:
            self._invalidate_set(s)

        if old is not None:
            self._detach_host(w.name)
            self._labels.remove(w.name)
        self._workloads[w.name] = w
        self._labels.add(w.name, w.labels)
        self._member_of[w.name] = now_in
        self._attach_host(w)
        self._policy_dirty = True
        return self._deltas(set_deltas, {w.name: old_policy}, changed_host=w.name)

    def remove_workload(self, name: str) -> list[HostDelta]:
        old = self._workloads.get(name)
        if old is None:
            raise NotFoundError(f"no workload named {name!r}")
        builder = _DeltaBuilder()
        for s in self._member_of.pop(name, set()):
            self._change_members(builder, s, old, add=False, only=None)
        set_deltas = builder.by_set()
        for s in set_deltas:
            self._invalidate_set(s)
        self._detach_host(name)
        self._labels.remove(name)
        del self._workloads[name]
        self._policy_dirty = True
        deltas = self._deltas(set_deltas, {}, changed_host=None)
        deltas.append(HostDelta(name, None, True, ()))
        return sorted(deltas, key=lambda d: d.workload)

    def replace_policy(self, policy: Policy) -> list[HostDelta]:
        """Swap in a new policy (rules, IP lists, services, inventory); diff every host."""
        old_policies = self.all_host_policies()
        with _bulk_allocation():
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
        set_deltas: dict[str, tuple[SetDelta, ...]],
        old_policies: dict[str, HostPolicy | None],
        changed_host: str | None,
    ) -> list[HostDelta]:
        labelsets: set[LabelSet] = set()
        for s in set_deltas:
            labelsets |= self._set_labelsets.get(s, set())
        hosts: list[tuple[str, LabelSet]] = [(h, ls) for ls in labelsets for h in self._ls_hosts.get(ls, ())]
        if changed_host is not None and changed_host not in {h for h, _ in hosts}:
            hosts.append((changed_host, self._key_of[changed_host]))
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


def _net_key(n: IPv4Network | IPv6Network) -> tuple[int, int]:
    return int(n.network_address), n.prefixlen


def compile_policy(policy: Policy) -> dict[str, HostPolicy]:
    """HostPolicy of every workload, by name."""
    return Compiler(policy).all_host_policies()


def compile_host(policy: Policy, workload: str) -> HostPolicy:
    """One host's policy without compiling the fleet: only its rules and the sets they reference.

    Gives exactly ``Compiler(policy).host_policy(workload)`` (a property test checks it).
    """
    w = next((x for x in policy.workloads if x.name == workload), None)
    if w is None:
        raise NotFoundError(f"no workload named {workload!r}")
    groups = policy.group_map()

    def selects(sel: Selector) -> bool:
        if isinstance(sel, AllWorkloads):
            return True
        return isinstance(sel, LabelSelector) and sel.matches(w.labels, groups)

    with _bulk_allocation():
        rules: set[HostRule] = set()
        peers: dict[str, Selector] = {}
        for r in expand_rules(policy):
            for direction, mine, theirs in (
                (Direction.INBOUND, r.providers, r.consumers),
                (Direction.OUTBOUND, r.consumers, r.providers),
            ):
                if any(selects(sel) for sel in mine):
                    for peer in theirs:
                        name = set_name(peer)
                        peers[name] = peer
                        rules.add(HostRule(r.action, direction, r.rule_id, name, r.services))
        index = LabelIndex()
        by_name = {x.name: x for x in policy.workloads}
        for x in policy.workloads:
            index.add(x.name, x.labels)
        iplists = policy.ip_list_map()
        sets: list[AddressSet] = []
        for name, sel in peers.items():
            if isinstance(sel, IPListSelector):
                iplist = iplists.get(sel.ip_list)
                if iplist is None:
                    raise NotFoundError(f"unknown IP list {sel.ip_list!r}")
                ranges = iplist.ranges()
                v4n, v6n = ranges.networks(Family.V4), ranges.networks(Family.V6)
            else:
                members = [by_name[m] for m in index.members(sel, groups)]
                v4n = MemberSet(Family.V4, (a for m in members for a in _ints(m, 4))).networks()
                v6n = MemberSet(Family.V6, (a for m in members for a in _ints(m, 6))).networks()
            canonical = sel.canonical()
            sets += [AddressSet(name, Family.V4, v4n, canonical), AddressSet(name, Family.V6, v6n, canonical)]
    return HostPolicy(
        workload=w.name,
        mode=w.mode,
        local_addresses=w.addresses,
        rules=tuple(sorted(rules)),
        sets=tuple(sorted(sets, key=_set_key)),
        failsafe=policy.failsafe,
    )
