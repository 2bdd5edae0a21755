"""The compiler: inventory + policy -> one HostPolicy per workload, kept up to date incrementally.

Design (see docs/architecture.md):

* Rules are compiled per distinct *relevant label set*, not per host (Cilium's identity idea):
  only labels some selector mentions can change which rules apply, so hosts whose mentioned
  labels are equal share one rule tuple; mode and own addresses are the only per-host parts.
* Every distinct peer selector is one address set named by a hash of its canonical form,
  so a peer joining or leaving changes set members and never rule text.
* ``upsert_workload`` / ``remove_workload`` find the sets the workload leaves or joins through
  the selector index (never a scan of all selectors), update them one address at a time
  (``MemberSet``s, held by ``sets.AddressSetStore``), and return per-host deltas: set elements
  added/removed, or a rules change.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from stockade.compiler.changes import DeltaBuilder, SetChanges, SetOnly
from stockade.compiler.delta import diff_sets
from stockade.compiler.expand import build_rule_table, expand_rules, set_name
from stockade.compiler.hostnet import address_int, workload_addresses
from stockade.compiler.index import SelectorIndex
from stockade.compiler.ir import AddressSet, HostDelta, HostPolicy, HostRule, WireGuardConfig, unchecked
from stockade.compiler.netpol import NetpolLayer
from stockade.compiler.sets import AddressSetStore, Ints
from stockade.compiler.wireguard import PeerIndex, config_for, merge_peer_only, same_port
from stockade.errors import NotFoundError
from stockade.model.addresses import IPAddress
from stockade.model.netpol import KubeNetworkPolicy
from stockade.model.policy import Policy
from stockade.model.selectors import AllWorkloads, LabelSelector, Selector
from stockade.model.workloads import EnforcementMode, Workload

__all__ = ["Compiler", "collections_paused", "compile_policy", "diff_sets", "set_name"]

LabelSet = frozenset[str]  # the relevant labels of a workload, as ``index.label_keys``


def _by_workload(d: HostDelta) -> str:
    return d.workload


def _selects_workloads(sel: Selector) -> bool:
    return isinstance(sel, LabelSelector | AllWorkloads)


class _BulkAllocation:
    """Pause the cyclic GC while building large acyclic structures, then freeze them.

    The compiler's state (a few million small objects at 125,000 workloads) is long-lived and
    acyclic. Without the freeze, the first full collection after a build walks all of it
    (4-9 s at 25,000 workloads, and it landed inside a measured relabel); ``gc.freeze()``
    moves everything alive into the permanent generation, which collections skip. Objects
    freed later are still freed by reference counting; only cyclic garbage that exists at
    the moment of the freeze would stay (the compiler makes none).

    ``freeze=False`` (a batch of workload changes): only pause the collector; the deltas it
    returns are short-lived, and freezing on every change would also freeze whatever cyclic
    garbage the rest of the process holds at that moment.

    A class, not a ``contextlib.contextmanager``: resuming the collector is the last thing
    ``__exit__`` does. The generator version allocated after it (its ``StopIteration``), which ran
    the collection the paused build was due right there, inside the compiler's call, over the
    125,000 deltas it had just made; now it runs at the caller's next allocation, and not at all
    if the caller drops the deltas first (freeing them lowers the count that triggers it).
    """

    __slots__ = ("_enabled", "_freeze")

    def __init__(self, freeze: bool) -> None:
        self._freeze = freeze
        self._enabled = False

    def __enter__(self) -> None:
        self._enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._freeze:
            gc.freeze()
        if self._enabled:
            gc.enable()  # last: nothing is allocated after it


def _bulk_allocation(freeze: bool = True) -> _BulkAllocation:
    return _BulkAllocation(freeze)


def collections_paused() -> _BulkAllocation:
    """No collection inside ``with collections_paused(): ...`` (bounded work whose allocations
    live on, or are freed by reference counting); the collector resumes last, as
    ``_bulk_allocation(freeze=False)`` does. A pause inside another (or begun while another
    thread's is on) leaves the collector off: the one that turned it off turns it back on. The
    controller's transactions and catch-ups run in one (``controller/services/fanout_collector``)."""
    return _BulkAllocation(False)


@dataclass(frozen=True)
class _LabelSetRules:
    rules: tuple[HostRule, ...]
    sets: tuple[str, ...]  # sorted names of the sets the rules reference
    member_of: frozenset[str]  # names of the workload sets a host with these labels is in
    encrypted_sets: tuple[str, ...] = ()  # peer sets of its encrypted rules (WireGuard peers)


# a HostPolicy minus set members: mode, addresses, label-set rules, backend
_Header = tuple[EnforcementMode, tuple[IPAddress, ...], _LabelSetRules, str | None]


class Compiler:
    """Incremental compiler. Construct with a Policy; read ``host_policy(name)``."""

    def __init__(self, policy: Policy) -> None:
        self._policy: Policy = policy
        self._policy_dirty: bool = False
        self._generation = 0
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
        self._table = build_rule_table(expand_rules(policy))
        self._np = NetpolLayer(policy.network_policies)
        table = self._table
        self._sel_index = SelectorIndex(self._groups)
        for sid, sel in enumerate(table.selectors):
            if _selects_workloads(sel):
                self._sel_index.add(sid, sel)
        self._peers: dict[str, Selector] = dict(zip(table.names, table.selectors, strict=True))
        # only labels some selector mentions can change which rules apply
        self._relevant: frozenset[str] = frozenset(self._sel_index.mentioned)
        self._addr_ints: dict[str, Ints] = {}

        # label sets: interned to small ints (one per distinct set of matched selectors), compiled once each
        self._workloads: dict[str, Workload] = {}
        self._key_of: dict[str, int] = {}
        self._ls_ids: dict[LabelSet, int] = {}
        self._ls_rules: list[_LabelSetRules] = []
        self._by_matched: dict[frozenset[int], int] = {}  # matched selector ids -> label set id
        self._ls_hosts: list[set[str]] = []
        # label set -> (change number when built, its AddressSets); stale once a set it references
        # changed later (``AddressSetStore.changed_after``): checked on read, so a change to a set referenced by
        # every label set costs O(1), not a pass over 100,000 label sets
        self._ls_sets: dict[int, tuple[int, tuple[AddressSet, ...]]] = {}
        self._generation += 1  # also bumped by every batch of workload changes
        # set name -> label sets referencing it; append-only lists (a label set id is never reused
        # nor dropped, and its sets are distinct): a list append is cheaper than a set add, and
        # 970,000 of them run in a full compile at 125,000 workloads
        self._set_labelsets: dict[str, list[int]] = defaultdict(list)
        # set name -> label sets with encrypted rules towards it (their tunnel peers are its members)
        self._enc_labelsets: dict[str, list[int]] = defaultdict(list)
        self._peer_index = PeerIndex()
        self._touched: set[str] = set()  # sets whose WireGuard-capable members may have changed
        for w in policy.workloads:
            self._workloads[w.name] = w
            self._attach_host(w)
        # the tunnel configuration last handed out, per host with encrypted rules
        self._wg_state: dict[str, WireGuardConfig] = {}
        for lsid in sorted({lsid for lsids in self._enc_labelsets.values() for lsid in lsids}):
            for name in self._ls_hosts[lsid]:  # only hosts with encrypted rules can have a tunnel
                wg = self._wireguard(name)
                if wg is not None:
                    self._wg_state[name] = wg

        # address sets: IP lists are static, workload sets filled from the hosts of each label set
        self._sets = AddressSetStore(
            self._peers, policy.ip_list_map(),
            ((compiled.member_of, map(self._ints, hosts)) for compiled, hosts in zip(self._ls_rules, self._ls_hosts,
                                                                                    strict=True)),
        )

    def _ints(self, name: str) -> Ints:
        """The integer v4 and v6 addresses of a workload (one int object each, shared by its sets)."""
        found = self._addr_ints.get(name)
        if found is None:
            addrs = workload_addresses(self._workloads[name])  # sorted, v4 first
            n4 = len(addrs)
            while n4 and not isinstance(addrs[n4 - 1], IPv4Address):
                n4 -= 1
            ints = tuple(map(address_int, addrs))
            found = self._addr_ints[name] = (ints[:n4], ints[n4:])
        return found

    def _labelset(self, w: Workload) -> int:
        """The id of the compiled rules of ``w``'s label set: label sets matching the same
        selectors (a quarter of them) share one id, one compiled object and one host list."""
        relevant = self._relevant
        ls = frozenset([k for lab in w.labels if (k := lab.key + "\0" + lab.value) in relevant])  # as label_keys
        lsid = self._ls_ids.get(ls)
        if lsid is None:
            matched = frozenset(self._sel_index.matching(ls))
            lsid = self._by_matched.get(matched)
            if lsid is None:
                lsid = self._by_matched[matched] = len(self._ls_rules)
                compiled = self._compile_matched(matched)
                self._ls_rules.append(compiled)
                self._ls_hosts.append(set())
                set_labelsets = self._set_labelsets
                for s in compiled.sets:
                    set_labelsets[s].append(lsid)
                for s in compiled.encrypted_sets:
                    self._enc_labelsets[s].append(lsid)
            self._ls_ids[ls] = lsid
        return lsid

    def _attach_host(self, w: Workload) -> None:
        lsid = self._labelset(w)
        self._key_of[w.name] = lsid
        self._ls_hosts[lsid].add(w.name)
        self._peer_index.add(w, self._ls_rules[lsid].member_of)

    def _detach_host(self, name: str) -> None:
        lsid = self._key_of.pop(name)
        self._ls_hosts[lsid].discard(name)
        self._addr_ints.pop(name, None)
        self._peer_index.remove(name, self._ls_rules[lsid].member_of)

    def _wireguard(self, name: str) -> WireGuardConfig | None:
        """The host's tunnel configuration: None unless an encrypted rule applies to it."""
        compiled = self._ls_rules[self._key_of[name]]
        if not compiled.encrypted_sets or self._workloads[name].mode is EnforcementMode.IDLE:
            return None  # idle: the agent touches nothing, so it runs no tunnel either
        peers = self._peer_index.members(compiled.encrypted_sets)
        return config_for(self._workloads[name], (self._workloads[p] for p in peers))

    # ---- per label set -------------------------------------------------------
    def _compile_matched(self, matched: frozenset[int]) -> _LabelSetRules:
        table = self._table
        rules_of = table.rules_of
        ids: set[int] = set().union(*[rules_of[sid] for sid in matched if sid in rules_of])
        if not ids:
            ordered: list[int] = []
        else:
            ordered = sorted(ids)  # host-rule ids are their ranks
        get_rule, get_peer = table.host_rules.__getitem__, table.peers.__getitem__
        encrypted = ids & table.encrypted if table.encrypted else ()
        return _LabelSetRules(
            tuple(map(get_rule, ordered)),
            tuple(sorted(set(map(get_peer, ordered)))),
            frozenset(map(table.names.__getitem__, matched)),
            tuple(sorted(set(map(get_peer, encrypted)))),
        )

    # ---- address sets ----------------------------------------------------------
    def address_sets(self, name: str) -> tuple[AddressSet, AddressSet]:
        return self._sets.address_sets(name)

    # ---- reading -----------------------------------------------------------------
    @property
    def workload_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._workloads))

    def host_policy(self, name: str) -> HostPolicy:
        w = self._workloads.get(name)
        if w is None:
            raise NotFoundError(f"no workload named {name!r}")
        lsid = self._key_of[name]
        compiled = self._ls_rules[lsid]
        entry = self._ls_sets.get(lsid)
        sets: tuple[AddressSet, ...] | None = None
        if entry is not None:
            built, sets = entry
            if built != self._generation and self._sets.changed_after(compiled.sets, built):
                sets = None
        if sets is None:
            sets = self._sets.sets_of(compiled.sets)  # sorted names: already in (name, family) order
            self._ls_sets[lsid] = (self._generation, sets)
        hp = unchecked(HostPolicy, {
            "workload": w.name,
            "mode": w.mode,
            "local_addresses": workload_addresses(w),
            "rules": compiled.rules,
            "sets": sets,
            "failsafe": self._policy.failsafe,
            "wireguard": self._wireguard(name) if compiled.encrypted_sets else None,
            "backend": w.backend,
        })
        if self._np.affects(name):
            hp = self._np.apply(hp, self._addresses)
        return hp

    def _addresses(self, name: str) -> tuple[IPAddress, ...]:
        w = self._workloads.get(name)
        return w.addresses if w is not None else ()

    def all_host_policies(self) -> dict[str, HostPolicy]:
        with _bulk_allocation():
            return {n: self.host_policy(n) for n in self.workload_names}

    def rule_count(self, name: str) -> int:
        return len(self._ls_rules[self._key_of[name]].rules)

    # ---- incremental changes ---------------------------------------------------
    def _change_members(self, builder: DeltaBuilder, s: str, ints: Ints, add: bool) -> None:
        self._sets.change_members(builder, s, ints, add)

    def _header(self, name: str) -> _Header:
        w = self._workloads[name]
        return w.mode, workload_addresses(w), self._ls_rules[self._key_of[name]], w.backend

    def _upsert(self, builder: DeltaBuilder, w: Workload) -> None:
        old = self._workloads.get(w.name)
        if old is not None:
            old_ints = self._ints(w.name)
            was_in = self._ls_rules[self._key_of[w.name]].member_of
            self._detach_host(w.name)
        else:
            old_ints, was_in = ((), ()), frozenset()
        self._workloads[w.name] = w
        self._attach_host(w)
        new_ints = self._ints(w.name)
        now_in = self._ls_rules[self._key_of[w.name]].member_of
        if old is None or old.wireguard != w.wireguard or old.mode != w.mode or was_in != now_in \
                or old_ints != new_ints:
            self._touched |= was_in | now_in
        for s in was_in - now_in:
            self._change_members(builder, s, old_ints, add=False)
        for s in now_in - was_in:
            self._change_members(builder, s, new_ints, add=True)
        if old_ints != new_ints:
            gone = tuple(tuple(a for a in o if a not in set(n)) for o, n in zip(old_ints, new_ints, strict=True))
            came = tuple(tuple(a for a in n if a not in set(o)) for o, n in zip(old_ints, new_ints, strict=True))
            for s in was_in & now_in:
                self._change_members(builder, s, (gone[0], gone[1]), add=False)
                self._change_members(builder, s, (came[0], came[1]), add=True)

    def _remove(self, builder: DeltaBuilder, name: str) -> None:
        ints = self._ints(name)
        self._touched |= self._ls_rules[self._key_of[name]].member_of
        for s in self._ls_rules[self._key_of[name]].member_of:
            self._change_members(builder, s, ints, add=False)
        self._detach_host(name)
        del self._workloads[name]

    def apply_set_changes(self, changes: Iterable[Workload | str]) -> SetChanges:
        """Apply upserts (a ``Workload``) and removals (a name), in order, as one batch.

        Returns the batch's effect keyed by address set (``compiler.changes``): each changed
        set's member delta once, and a full policy for the changed workloads whose own policy
        changed beyond set members. Costs O(sets the changed workloads are members of),
        whatever the number of hosts subscribing to those sets. An unknown name to remove
        raises ``NotFoundError`` before anything changes.
        """
        batch = list(changes)
        present: dict[str, bool] = {}
        for c in batch:
            if isinstance(c, str):
                if not present.get(c, c in self._workloads):
                    raise NotFoundError(f"no workload named {c!r}")
                present[c] = False
            else:
                present[c.name] = True
        if not batch:
            return SetChanges(self._generation, (), ())
        np_sets = self._np.sets_of(present)  # NetworkPolicy peer sets naming a changed workload
        np_old = {n: self._np.address_sets(n, self._addresses) for n in np_sets}
        self._generation += 1
        before: dict[str, _Header | None] = {}
        builder = DeltaBuilder()
        with _bulk_allocation(freeze=False):  # a batch can allocate a lot: no GC pass midway
            for c in batch:
                name = c if isinstance(c, str) else c.name
                if name not in before:
                    before[name] = self._header(name) if name in self._workloads else None
                if isinstance(c, str):
                    self._remove(builder, c)
                else:
                    self._upsert(builder, c)
            self._policy_dirty = True
            set_deltas = builder.set_deltas()
            for d in set_deltas:
                self._sets.invalidate(d.name, self._generation)
            if np_old:  # NetworkPolicy peer sets naming a changed workload: their deltas too
                self._np.forget(np_old)
                np_deltas = [
                    d for n, old in np_old.items() for d in diff_sets(old, self._np.address_sets(n, self._addresses))
                ]
                set_deltas = tuple(sorted((*set_deltas, *np_deltas), key=lambda d: (d.name, d.family.value)))
            reloads: list[HostDelta] = []
            for name in sorted(before):
                header = before[name]
                if name not in self._workloads:
                    if header is not None:
                        reloads.append(HostDelta(name, None, True, ()))
                    continue
                hp = self.host_policy(name)
                if header is not None:
                    mode, addresses, was, backend = header
                    now = self._ls_rules[self._key_of[name]]
                    same_rules = was is now or (was.rules == now.rules and was.sets == now.sets)
                    # HostPolicy.rules_key: a re-addressed host reloads (renderers use its addresses)
                    if mode == hp.mode and addresses == hp.local_addresses and same_rules and backend == hp.backend:
                        old_wg = self._wg_state.get(name)
                        if old_wg == hp.wireguard:
                            continue  # only set members can differ: a subscriber like any other
                        if same_port(old_wg, hp.wireguard):  # only its peers moved: a peer delta
                            reloads.append(HostDelta(name, hp, False, (), True))
                            continue
                reloads.append(HostDelta(name, hp, True, ()))
            reloads.extend(self._tunnel_reloads(before))
            # built while the collector is paused: an allocation after it resumes would run the
            # collection the batch's allocations are due, inside this call, over its own output
            return SetChanges(self._generation, set_deltas, tuple(sorted(reloads, key=_by_workload)))

    def _tunnel_reloads(self, before: dict[str, _Header | None]) -> list[HostDelta]:
        """Hosts with encrypted rules whose tunnel peers came, went, rotated or moved in this batch:
        a peer delta each (``peers_changed``; rendered rules never name a peer). Also keeps the tunnel
        state of the batch's own workloads current (their reloads were decided by the caller)."""
        out: list[HostDelta] = []
        for name in before:
            if name not in self._workloads:
                self._wg_state.pop(name, None)
            else:
                self._remember_tunnel(name, self.host_policy(name).wireguard)
        # a host's peers are the members of its encrypted rules' sets: only those sets matter (the
        # all-workloads set is in every label set's sets, so this used to walk all of them)
        labelsets = {lsid for s in self._touched for lsid in self._enc_labelsets.get(s, ())}
        self._touched = set()
        for lsid in labelsets:
            for h in self._ls_hosts[lsid]:
                if h in before:
                    continue
                hp = self.host_policy(h)
                old_wg = self._wg_state.get(h)
                if self._remember_tunnel(h, hp.wireguard):  # its rules did not change: peers only
                    same = same_port(old_wg, hp.wireguard)
                    out.append(HostDelta(h, hp, not same, (), same))
        return out

    def _remember_tunnel(self, name: str, wg: WireGuardConfig | None) -> bool:
        """Record the tunnel configuration handed to ``name``; True when it changed."""
        old = self._wg_state.pop(name, None)
        if wg is not None:
            self._wg_state[name] = wg
        return old != wg

    def subscribers(self, set_name: str) -> Iterator[str]:
        """Hosts whose policy references the address set ``set_name`` (in no particular order)."""
        hosts, np = self._ls_hosts, self._np
        for lsid in self._set_labelsets.get(set_name, ()):
            for h in hosts[lsid]:
                # a direction isolated by a NetworkPolicy drops the label rules (and their sets)
                if not np.active or not np.affects(h) or any(s.name == set_name for s in self.host_policy(h).sets):
                    yield h
        if np.active:
            yield from (h for h in np.hosts_of_set.get(set_name, ()) if h in self._workloads)

    def host_deltas(self, changes: SetChanges, grouped: list[SetOnly] | None = None) -> list[HostDelta]:
        """``changes`` fanned out to one ``HostDelta`` per affected host, sorted by name.

        Only valid right after the ``apply_set_changes`` that returned ``changes`` (the
        subscribers are read from the current state): a later call raises ``ValueError``.
        With ``grouped``, the hosts of a label set whose change is set members only (no
        NetworkPolicy in force, no WireGuard peers, no other change of theirs in the batch) are
        appended there, per label set, instead of getting a HostDelta (and a HostPolicy) each.
        """
        if changes.generation != self._generation:
            raise ValueError("SetChanges is stale: the compiler changed since (expand it right away)")
        by_set = changes.by_set()
        reloaded = {d.workload for d in changes.reloads if d.rules_changed or d.policy is None}
        touched = {d.workload for d in changes.reloads}
        labelsets: set[int] = set()
        for s in by_set:
            labelsets.update(self._set_labelsets.get(s, ()))
        out = list(changes.reloads)
        with _bulk_allocation(freeze=False):
            for lsid in labelsets:
                deltas = tuple(d for s in self._ls_rules[lsid].sets for d in by_set.get(s, ()))
                if not deltas:
                    continue
                hosts = self._ls_hosts[lsid]
                if grouped is not None and not self._np.active and not self._ls_rules[lsid].encrypted_sets:
                    grouped.append(SetOnly(tuple(h for h in hosts if h not in touched), deltas))
                    hosts = hosts & touched
                for h in hosts:
                    if h not in reloaded:
                        out.append(HostDelta(h, self.host_policy(h), False, deltas))
            out = merge_peer_only(out)
            if self._np.active:
                out = self._netpol_fanout(out, changes)
            # sorted before the collector resumes: the first allocation after it would run a
            # collection over the 125,000 deltas just made (the caller usually drops them first,
            # and freeing them lowers the count that triggers it)
            out.sort(key=_by_workload)
        return out

    def _netpol_fanout(self, out: list[HostDelta], changes: SetChanges) -> list[HostDelta]:
        """``out`` corrected for hosts under NetworkPolicy: the deltas of exactly the sets their
        layered policy holds (peer sets added, sets of an isolated direction left out)."""
        by_host = {d.workload: d for d in out}
        hosts = {h for d in changes.set_deltas for h in self._np.hosts_of_set.get(d.name, ()) if h in self._workloads}
        hosts |= {h for h in by_host if self._np.affects(h)}
        for h in sorted(hosts):
            d = by_host.get(h)
            if d is not None and (d.policy is None or d.rules_changed):
                continue
            hp = self.host_policy(h)
            names = {s.name for s in hp.sets}
            deltas = tuple(x for x in changes.set_deltas if x.name in names)
            peers = d is not None and d.peers_changed
            if deltas or peers:
                by_host[h] = HostDelta(h, hp, False, deltas, peers)
            else:
                by_host.pop(h, None)
        return list(by_host.values())

    def apply_changes(self, changes: Iterable[Workload | str]) -> list[HostDelta]:
        """``apply_set_changes`` fanned out per host (``host_deltas``).

        Returns at most one ``HostDelta`` per affected host, sorted by name: the change from
        the state before the batch to the state after it, exactly what applying the changes
        one by one and merging their deltas gives (a property test checks it). A pod churn
        of 1,000 creates touching one host's peer set is one set delta for that host.
        An unknown name to remove raises ``NotFoundError`` before anything changes.
        """
        return self.host_deltas(self.apply_set_changes(changes))

    def replace_network_policies(self, policies: tuple[KubeNetworkPolicy, ...]) -> list[HostDelta]:
        """Swap the resolved NetworkPolicies; diff only the hosts the changed ones govern."""
        old = {(p.namespace, p.name): p for p in self._policy.network_policies}
        new = {(p.namespace, p.name): p for p in policies}
        changed = [p for k in set(old) | set(new) if old.get(k) != new.get(k) for p in (old.get(k), new.get(k))
                   if p is not None]
        if not changed:
            return []
        hosts = sorted({h for p in changed for h in p.selected if h in self._workloads})
        before = {h: self.host_policy(h) for h in hosts}
        self._policy = replace(self.policy, network_policies=tuple(sorted(policies)))
        for k in set(old) | set(new):
            if old.get(k) != new.get(k):
                self._np.replace(old.get(k), new.get(k))
        deltas: list[HostDelta] = []
        for h in hosts:
            hp = self.host_policy(h)
            if hp.rules_key() != before[h].rules_key():
                deltas.append(HostDelta(h, hp, True, ()))
            elif hp != before[h]:
                deltas.append(HostDelta(h, hp, False, diff_sets(before[h].sets, hp.sets)))
        return deltas

    def upsert_workload(self, w: Workload) -> list[HostDelta]:
        """Add or replace one workload; returns the delta of every affected host."""
        return self.apply_changes((w,))

    def upsert_workloads(self, workloads: Iterable[Workload]) -> list[HostDelta]:
        """Add or replace many workloads as one batch (see ``apply_changes``)."""
        return self.apply_changes(workloads)

    def remove_workload(self, name: str) -> list[HostDelta]:
        return self.apply_changes((name,))

    def remove_workloads(self, names: Iterable[str]) -> list[HostDelta]:
        """Remove many workloads as one batch (see ``apply_changes``)."""
        return self.apply_changes(names)

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


def compile_policy(policy: Policy) -> dict[str, HostPolicy]:
    """HostPolicy of every workload, by name."""
    return Compiler(policy).all_host_policies()

