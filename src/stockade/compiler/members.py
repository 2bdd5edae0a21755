"""Mutable member sets of one address family, updated one address at a time.

A peer set of workload addresses is kept as merged integer ranges plus its minimal CIDR
cover. Adding or removing one address touches only the range it falls in or next to, so
the CIDRs to delete and to add come out directly (the ``SetDelta``) without diffing the
whole set: a relabel costs the same for a 10-member and a 25,000-member set.

The networks themselves are kept as immutable chunks once a set changes (``MemberSet.chunks``):
a change copies the one chunk it falls in, and a snapshot of the set (what a new host policy
holds) is a tuple of chunk references shared with every earlier snapshot. Copying the flat
tuple of the all-workloads set (125,000 networks) into each new policy was most of a create.

``NetworkCache`` hands out one ``IPv4Network``/``IPv6Network`` object per (address, prefix):
an address is a member of a dozen sets, and at 125,000 workloads building those objects
once instead of once per set was a third of a full compile (and of its memory).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network
from itertools import chain, compress, count
from operator import sub

from stockade.compiler.hostnet import address_int, host_network_maker
from stockade.model.addresses import Family, IPNetwork, Range


class _Hosts(dict[int, IPNetwork]):
    """address -> its one-address network (/32 or /128), made on first use."""

    def __init__(self, v4: bool) -> None:
        super().__init__()
        self._make = _MAKERS[v4]

    def __missing__(self, a: int) -> IPNetwork:
        net = self[a] = self._make(a)
        return net


# networks per chunk of a changed set: a change copies one chunk (up to twice this), a snapshot one
# reference per chunk (~250 for a 125,000-member set)
CHUNK = 512

def _net_start(net: IPNetwork) -> int:
    return address_int(net.network_address)


_MAKERS = {v4: host_network_maker(v4) for v4 in (True, False)}


class NetworkCache:
    """One shared network object per (first address, prefix length) and family."""

    def __init__(self) -> None:
        self._nets: dict[bool, dict[int, IPNetwork]] = {True: {}, False: {}}  # keyed by "is IPv4"
        # one-address networks (most members) in their own map keyed by the address alone
        self._hosts: dict[bool, _Hosts] = {True: _Hosts(True), False: _Hosts(False)}

    def hosts(self, addresses: list[int], family: Family) -> tuple[IPNetwork, ...]:
        """The one-address networks of ``addresses``, in the same order."""
        return tuple(map(self._hosts[family is Family.V4].__getitem__, addresses))

    def run_networks(self, los: list[int], his: list[int], family: Family) -> tuple[IPNetwork, ...]:
        """``networks(zip(los, his))``, with the one-address runs (most of them, even in a set whose
        members are often adjacent) looked up in C a slice at a time: only the wider runs take the
        CIDR loop."""
        get = self._hosts[family is Family.V4].__getitem__
        out: list[IPNetwork] = []
        start = 0
        for i in compress(count(), map(sub, his, los)):  # the runs of more than one address
            if i > start:
                out += map(get, los[start:i])
            out += self.networks(((los[i], his[i]),), family)
            start = i + 1
        out += map(get, los[start:])
        return tuple(out)

    def networks(self, ranges: Iterable[Range], family: Family) -> tuple[IPNetwork, ...]:
        """Minimal CIDR cover of merged ranges, in address order (as ``ranges_to_networks``)."""
        v4 = family is Family.V4
        bits = 32 if v4 else 128
        cls: type[IPv4Network] | type[IPv6Network] = IPv4Network if v4 else IPv6Network
        nets = self._nets[v4]
        hosts = self._hosts[v4]
        out: list[IPNetwork] = []
        for lo, hi in ranges:
            if lo == hi:  # the common case: one workload address
                out.append(hosts[lo])
                continue
            cur = lo
            while cur <= hi:
                size = (cur & -cur).bit_length() - 1 if cur else bits
                span = (hi - cur + 1).bit_length() - 1
                size = min(size, span)
                if size == 0:
                    net = hosts[cur]
                else:
                    key = cur << 8 | (bits - size)
                    net = nets.get(key)  # type: ignore[assignment]
                    if net is None:
                        net = nets[key] = cls((cur, bits - size))
                out.append(net)
                cur += 1 << size
        return tuple(out)


class MemberSet:
    """Single addresses of one family (with reference counts) as ranges and minimal CIDRs."""

    # a full compile at 125,000 workloads makes ~250,000 of these, most with one or two members:
    # slots (no instance dict) and the early return below are for them
    __slots__ = ("_cache", "_chunk", "_chunks", "_extra", "_frozen", "_heads", "_his", "_los", "_snapshot", "family")

    def __init__(
        self, family: Family, addresses: Iterable[int] = (), cache: NetworkCache | None = None, chunk: int | None = None
    ) -> None:
        self.family = family
        self._cache = cache = cache if cache is not None else NetworkCache()
        # the networks in address order: one flat tuple until the first change, then chunks of
        # ``chunk`` to ``2 * chunk`` networks (see ``chunks``); the flat tuple is rebuilt on demand
        self._chunk = chunk if chunk is not None else CHUNK  # read at run time: tests make it tiny
        self._chunks: list[tuple[IPNetwork, ...]] | None = None
        self._heads: list[int] = []  # first address of each chunk's first network (-1 for chunk 0)
        self._snapshot: tuple[tuple[IPNetwork, ...], ...] | None = None
        # membership is the ranges themselves (a bisect); only an address added more than once
        # has an entry here (its extra count), so a set costs no per-member dict
        self._extra: dict[int, int] = {}
        addrs = list(addresses)
        if len(addrs) < 2:  # empty or one member: one run (or none), nothing to sort or merge
            self._los = self._his = addrs  # one list for both until the first change (``_own``)
            self._frozen: tuple[IPNetwork, ...] | None = cache.hosts(addrs, family)
            return
        distinct = set(addrs)
        if len(distinct) != len(addrs):
            self._extra = {a: n - 1 for a, n in Counter(addrs).items() if n > 1}
        ordered = sorted(distinct)
        if not ordered or ordered[-1] - ordered[0] == len(ordered) - 1:  # empty, or one run
            los = ordered[:1]
            his = ordered[-1:]
        elif 1 not in map(sub, ordered[1:], ordered):  # no two adjacent: a run each (in C)
            los = his = ordered  # one list for both until the first change (``_own``)
        else:
            los, his = [], []
            prev = -2
            for a in ordered:
                if a == prev + 1:
                    his[-1] = a
                else:
                    los.append(a)
                    his.append(a)
                prev = a
        self._los, self._his = los, his
        if len(los) == len(ordered):  # no two members adjacent (the usual case): one /32 or /128 each
            self._frozen = cache.hosts(ordered, family)
        else:
            self._frozen = cache.run_networks(los, his, family)

    def networks(self) -> tuple[IPNetwork, ...]:
        """The members as one flat tuple (built from the chunks after a change: O(members))."""
        if self._frozen is None:
            chunks = self._chunks
            assert chunks is not None
            self._frozen = chunks[0] if len(chunks) == 1 else tuple(chain.from_iterable(chunks))
        return self._frozen

    def flat(self) -> tuple[IPNetwork, ...] | None:
        """The flat tuple if it is already built (never changed, or read since), else None."""
        return self._frozen

    def chunks(self) -> tuple[tuple[IPNetwork, ...], ...]:
        """The members as consecutive immutable chunks (their concatenation is ``networks()``).

        A change replaces the one chunk it falls in (O(chunk)); every other chunk object is kept,
        so a snapshot after a change costs O(members / chunk) and shares the rest with the
        snapshots before it (what an ``AddressSet`` made by ``chunked_address_set`` holds)."""
        if self._chunks is None:
            assert self._frozen is not None
            return (self._frozen,)
        if self._snapshot is None:
            self._snapshot = tuple(self._chunks)
        return self._snapshot

    def _replace(self, addr: int, count: int, nets: tuple[IPNetwork, ...]) -> None:
        """The ``count`` networks from the one starting at ``addr`` (or, for ``count == 0``, the
        place where ``addr`` goes) become ``nets``, copying the one chunk they are in (two when they
        straddle a boundary), never the whole set. Chunks are found by their first address and
        the place in a chunk by bisecting its networks' starts: no per-member index to keep."""
        chunks = self._chunks
        size = self._chunk
        if chunks is None:  # first change: cut the flat tuple into chunks
            flat = self._frozen
            assert flat is not None
            chunks = self._chunks = [flat[i : i + size] for i in range(0, len(flat), size)] or [()]
            self._heads = [-1, *(_net_start(ch[0]) for ch in chunks[1:])]
        c = bisect_right(self._heads, addr) - 1
        chunk = chunks[c]
        k = bisect_left(chunk, addr, key=_net_start)
        need = k + count
        d, span = c, len(chunk)
        while span < need:  # the old networks run on into the next chunk
            d += 1
            span += len(chunks[d])
        merged = chunk if c == d else tuple(chain.from_iterable(chunks[c : d + 1]))
        merged = merged[:k] + nets + merged[need:]
        if len(merged) > 2 * size:
            pieces = [merged[i : i + size] for i in range(0, len(merged), size)]
        elif merged or d - c + 1 == len(chunks):  # an emptied chunk goes, unless it is the only one
            pieces = [merged]
        else:
            pieces = []
        chunks[c : d + 1] = pieces
        self._heads[c : d + 1] = [_net_start(p[0]) if p else -1 for p in pieces]
        self._heads[0] = -1
        self._frozen = None
        self._snapshot = None

    def _splice(self, old: list[Range], new: list[Range]) -> tuple[set[IPNetwork], set[IPNetwork]]:
        old_nets = self._cache.networks(old, self.family)
        new_nets = self._cache.networks(new, self.family)
        # the old networks start where the first old range does (ranges are sorted, covers in order)
        self._replace(old[0][0] if old else new[0][0], len(old_nets), new_nets)
        old_set, new_set = set(old_nets), set(new_nets)
        return new_set - old_set, old_set - new_set

    def _own(self) -> None:
        """Give the run bounds lists their own before changing them: a set with no two members
        adjacent (most sets) is built with one list for both."""
        if self._his is self._los:
            self._his = self._los[:]

    def add(self, a: int) -> tuple[set[IPNetwork], set[IPNetwork]]:
        """Add one address; returns (CIDRs added, CIDRs removed)."""
        i = bisect_right(self._los, a) - 1
        if i >= 0 and a <= self._his[i]:  # already a member: one more reference
            self._extra[a] = self._extra.get(a, 0) + 1
            return set(), set()
        self._own()
        left = i if i >= 0 and self._his[i] == a - 1 else None
        right = i + 1 if i + 1 < len(self._los) and self._los[i + 1] == a + 1 else None
        lo = self._los[left] if left is not None else a
        hi = self._his[right] if right is not None else a
        old = [(self._los[k], self._his[k]) for k in (left, right) if k is not None]
        pos = left if left is not None else i + 1
        self._los[pos : pos + len(old)] = [lo]
        self._his[pos : pos + len(old)] = [hi]
        return self._splice(old, [(lo, hi)])

    def remove(self, a: int) -> tuple[set[IPNetwork], set[IPNetwork]]:
        """Remove one address; returns (CIDRs added, CIDRs removed)."""
        k = bisect_right(self._los, a) - 1
        if k < 0 or a > self._his[k]:  # not a member
            return set(), set()
        extra = self._extra.get(a)
        if extra:  # still referenced
            if extra == 1:
                del self._extra[a]
            else:
                self._extra[a] = extra - 1
            return set(), set()
        self._own()
        lo, hi = self._los[k], self._his[k]
        pieces = [r for r in ((lo, a - 1), (a + 1, hi)) if r[0] <= r[1]]
        self._los[k : k + 1] = [p[0] for p in pieces]
        self._his[k : k + 1] = [p[1] for p in pieces]
        return self._splice([(lo, hi)], pieces)
