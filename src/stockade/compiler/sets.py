"""The compiler's address sets: every peer set's members, kept current one address at a time.

``Compiler`` (``compile.py``) decides *which* sets a host's rules reference and which sets a
workload is a member of; this module holds *what is in them*:

* IP-list sets are static: built once from the policy's IP lists, never changed by workload
  changes;
* workload sets (label selectors, all workloads) are a ``MemberSet`` per family, filled once
  from the members grouped by label set, then changed per address (``change_members``), so a
  relabel costs O(addresses moved), never a rebuild of a 125,000-member set;
* the frozen ``AddressSet`` pair of a set is built on first read and cached until its members
  change (``invalidate``); after a change it holds the set's chunks, not a fresh flat tuple
  (``ir.chunked_address_set``), so a create's own policy costs O(chunks) per changed set; each
  change is stamped with the compiler's change number so a label set's cached tuple of sets can
  tell whether it went stale (``changed_after``) in O(its sets).

Pure: no I/O. The split from ``compile.py`` follows the pipeline's own seam: rules reference
sets by name, and only this store knows their members.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain

from stockade.compiler.changes import DeltaBuilder
from stockade.compiler.ir import AddressSet, chunked_address_set, unchecked
from stockade.compiler.members import MemberSet, NetworkCache
from stockade.errors import NotFoundError
from stockade.model.addresses import Family, IPList
from stockade.model.selectors import IPListSelector, Selector

# the integer v4 and v6 addresses of one workload
Ints = tuple[tuple[int, ...], tuple[int, ...]]


def _address_set(name: str, family: Family, ms: MemberSet, canonical: str) -> AddressSet:
    """The ``AddressSet`` of ``ms`` now: its flat tuple while it has one (a full compile), else its
    chunks (after a change: O(chunks), sharing every unchanged chunk with earlier policies)."""
    flat = ms.flat()
    if flat is not None:
        return unchecked(AddressSet, {"name": name, "family": family, "members": flat, "selector": canonical})
    return chunked_address_set(name, family, ms.chunks(), canonical)


class AddressSetStore:
    """Members of every peer set by name (see the module docstring)."""

    def __init__(
        self,
        peers: Mapping[str, Selector],
        iplists: Mapping[str, IPList],
        groups: Iterable[tuple[frozenset[str], Iterable[Ints]]],
    ) -> None:
        """``peers``: set name -> its selector; ``groups``: (names of the workload sets some
        hosts are members of, those hosts' addresses), one group per label set."""
        self._peers = peers
        self._nets = NetworkCache()
        self._static: dict[str, tuple[AddressSet, AddressSet]] = {}
        members: dict[str, tuple[list[int], list[int]]] = {}
        for name, sel in peers.items():
            if isinstance(sel, IPListSelector):
                iplist = iplists.get(sel.ip_list)
                if iplist is None:
                    raise NotFoundError(f"unknown IP list {sel.ip_list!r}")
                ranges = iplist.ranges()
                canonical = sel.canonical()
                self._static[name] = (
                    AddressSet(name, Family.V4, ranges.networks(Family.V4), canonical),
                    AddressSet(name, Family.V6, ranges.networks(Family.V6), canonical),
                )
            else:
                members[name] = ([], [])
        for member_of, hosts in groups:
            v4: list[int] = []
            v6: list[int] = []
            for a4, a6 in hosts:
                v4 += a4
                v6 += a6
            for s in member_of:
                m4, m6 = members[s]
                m4 += v4
                m6 += v6
        self._member_sets: dict[str, tuple[MemberSet, MemberSet]] = {
            name: (MemberSet(Family.V4, m4, self._nets), MemberSet(Family.V6, m6, self._nets))
            for name, (m4, m6) in members.items()
        }
        self._cache: dict[str, tuple[AddressSet, AddressSet]] = dict(self._static)  # IP lists never change
        self._changed: dict[str, int] = {}  # set name -> change number of its last member change

    def address_sets(self, name: str) -> tuple[AddressSet, AddressSet]:
        """The (v4, v6) ``AddressSet``s of the set ``name``."""
        cached = self._cache.get(name)
        if cached is None:
            v4, v6 = self._member_sets[name]
            canonical = self._peers[name].canonical()
            cached = (_address_set(name, Family.V4, v4, canonical), _address_set(name, Family.V6, v6, canonical))
            self._cache[name] = cached
        return cached

    def sets_of(self, names: tuple[str, ...]) -> tuple[AddressSet, ...]:
        """The ``AddressSet``s of ``names`` (sorted), in (name, family) order."""
        pairs = list(map(self._cache.get, names))
        if None in pairs:  # some not built yet (or changed since)
            pairs = [p or self.address_sets(s) for p, s in zip(pairs, names, strict=True)]
        return tuple(chain.from_iterable(pairs))  # type: ignore[arg-type]

    def changed_after(self, names: Iterable[str], change: int) -> bool:
        """Whether a member of any of ``names`` changed after change number ``change``."""
        changed = self._changed
        return any(changed.get(s, 0) > change for s in names)

    def change_members(self, builder: DeltaBuilder, name: str, ints: Ints, add: bool) -> None:
        """Add (or remove) one workload's addresses to the set ``name``, recording the CIDR changes."""
        for ms, addrs in zip(self._member_sets[name], ints, strict=True):
            for a in addrs:
                added, removed = ms.add(a) if add else ms.remove(a)
                if added or removed:
                    builder.record((name, ms.family), added, removed)

    def invalidate(self, name: str, change: int) -> None:
        """The set ``name`` changed in change number ``change``: rebuild its AddressSets on next read."""
        self._cache.pop(name, None)
        self._changed[name] = change
