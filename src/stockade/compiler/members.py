"""Mutable member sets of one address family, updated one address at a time.

A peer set of workload addresses is kept as merged integer ranges plus its minimal CIDR
cover. Adding or removing one address touches only the range it falls in or next to, so
the CIDRs to delete and to add come out directly (the ``SetDelta``) without diffing the
whole set: a relabel costs the same for a 10-member and a 25,000-member set.

``NetworkCache`` hands out one ``IPv4Network``/``IPv6Network`` object per (address, prefix):
an address is a member of a dozen sets, and at 125,000 workloads building those objects
once instead of once per set was a third of a full compile (and of its memory).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network

from stockade.model.addresses import Family, IPNetwork, Range


class NetworkCache:
    """One shared network object per (first address, prefix length) and family."""

    def __init__(self) -> None:
        self._nets: dict[bool, dict[int, IPNetwork]] = {True: {}, False: {}}  # keyed by "is IPv4"

    def networks(
        self, ranges: Iterable[Range], family: Family, starts: list[int] | None = None
    ) -> tuple[IPNetwork, ...]:
        """Minimal CIDR cover of merged ranges, in address order (as ``ranges_to_networks``).

        ``starts``, when given, receives the first address of each network as an int.
        """
        v4 = family is Family.V4
        bits = 32 if v4 else 128
        cls: type[IPv4Network] | type[IPv6Network] = IPv4Network if v4 else IPv6Network
        nets = self._nets[v4]
        out: list[IPNetwork] = []
        for lo, hi in ranges:
            if lo == hi:  # the common case: one workload address
                key = lo << 8 | bits
                net = nets.get(key)
                if net is None:
                    net = nets[key] = cls((lo, bits))
                out.append(net)
                if starts is not None:
                    starts.append(lo)
                continue
            cur = lo
            while cur <= hi:
                size = (cur & -cur).bit_length() - 1 if cur else bits
                span = (hi - cur + 1).bit_length() - 1
                size = min(size, span)
                key = cur << 8 | (bits - size)
                net = nets.get(key)
                if net is None:
                    net = nets[key] = cls((cur, bits - size))
                out.append(net)
                if starts is not None:
                    starts.append(cur)
                cur += 1 << size
        return tuple(out)


class MemberSet:
    """Single addresses of one family (with reference counts) as ranges and minimal CIDRs."""

    def __init__(self, family: Family, addresses: Iterable[int] = (), cache: NetworkCache | None = None) -> None:
        self.family = family
        self._cache = cache if cache is not None else NetworkCache()
        addrs = addresses if isinstance(addresses, list) else list(addresses)
        # a plain dict of ones (an address is usually in a set once); Counter only for repeats
        count: dict[int, int] = dict.fromkeys(addrs, 1)
        if len(count) != len(addrs):
            count = dict(Counter(addrs))
        self._count = count
        ordered = sorted(count)
        if not ordered or ordered[-1] - ordered[0] == len(ordered) - 1:  # empty, or one run
            los = ordered[:1]
            his = ordered[-1:]
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
        self._starts: list[int] = []
        self._nets: list[IPNetwork] = list(self._cache.networks(zip(los, his, strict=True), family, self._starts))
        self._frozen: tuple[IPNetwork, ...] | None = None

    def networks(self) -> tuple[IPNetwork, ...]:
        if self._frozen is None:
            self._frozen = tuple(self._nets)
        return self._frozen

    def _splice(self, old: list[Range], new: list[Range]) -> tuple[set[IPNetwork], set[IPNetwork]]:
        old_starts: list[int] = []
        new_starts: list[int] = []
        old_nets = self._cache.networks(old, self.family, old_starts)
        new_nets = self._cache.networks(new, self.family, new_starts)
        if old_nets:
            pos = bisect_left(self._starts, old_starts[0])
            end = pos + len(old_nets)
        else:
            pos = end = bisect_left(self._starts, new[0][0])
        self._nets[pos:end] = new_nets
        self._starts[pos:end] = new_starts
        self._frozen = None
        old_set, new_set = set(old_nets), set(new_nets)
        return new_set - old_set, old_set - new_set

    def add(self, a: int) -> tuple[set[IPNetwork], set[IPNetwork]]:
        """Add one address; returns (CIDRs added, CIDRs removed)."""
        c = self._count.get(a, 0)
        self._count[a] = c + 1
        if c:
            return set(), set()
        i = bisect_right(self._los, a) - 1
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
        c = self._count.get(a, 0)
        if c == 0:
            return set(), set()
        if c > 1:
            self._count[a] = c - 1
            return set(), set()
        del self._count[a]
        k = bisect_right(self._los, a) - 1
        lo, hi = self._los[k], self._his[k]
        pieces = [r for r in ((lo, a - 1), (a + 1, hi)) if r[0] <= r[1]]
        self._los[k : k + 1] = [p[0] for p in pieces]
        self._his[k : k + 1] = [p[1] for p in pieces]
        return self._splice([(lo, hi)], pieces)
