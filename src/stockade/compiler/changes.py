"""Set-keyed results of workload changes: each changed address set named once, not once per host.

At 125,000 workloads a create, delete or re-address changes the members of the all-workloads
set that every host references (the estate's override-deny rules name it), so a per-host delta
list is 125,000 ``HostDelta`` objects and ~1.2 s of building them, for one SetDelta's worth of
information. :meth:`Compiler.apply_set_changes <stockade.compiler.Compiler.apply_set_changes>`
answers with a :class:`SetChanges` instead, in time proportional to the sets the changed
workloads are members of:

* ``set_deltas``: the member changes of every changed set, once each (the same CIDRs every
  subscribing host applies);
* ``reloads``: the changed workloads whose own policy changed beyond set members (created,
  removed, re-addressed, moved to other rules or mode): a full HostPolicy each.

Every other host whose policy changed is a *subscriber* of a changed set (its rules reference
it) and needs exactly those sets' deltas. The compiler knows the subscribers through its
set -> label set -> hosts index (``Compiler.subscribers``) and expands a ``SetChanges`` into the
per-host ``HostDelta`` list on demand (``Compiler.host_deltas``), which is what
``Compiler.apply_changes`` returns. A ``SetChanges`` is valid for that expansion until the
compiler's next change (it carries the compiler's change number and a late expansion raises).

:class:`DeltaBuilder` accumulates the CIDR changes of a batch per set, cancelling opposites.
Pure data; no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from stockade.compiler.ir import HostDelta, SetDelta
from stockade.model.addresses import Family, IPNetwork

__all__ = ["DeltaBuilder", "SetChanges", "SetOnly"]


def _net_key(n: IPv4Network | IPv6Network) -> tuple[int, int]:
    return int(n.network_address), n.prefixlen


@dataclass(frozen=True)
class SetChanges:
    """What one batch of workload changes did, keyed by address set (see the module docstring)."""

    generation: int  # the compiler's change number right after this batch
    set_deltas: tuple[SetDelta, ...]  # sorted by (name, family); one per changed set and family
    reloads: tuple[HostDelta, ...]  # sorted by workload; rules_changed (or policy None: removed)

    def by_set(self) -> dict[str, tuple[SetDelta, ...]]:
        """Set name -> its deltas (v4 then v6)."""
        out: dict[str, list[SetDelta]] = defaultdict(list)
        for d in self.set_deltas:
            out[d.name].append(d)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def changed_sets(self) -> tuple[str, ...]:
        return tuple(sorted({d.name for d in self.set_deltas}))


@dataclass(frozen=True)
class SetOnly:
    """Hosts of one label set whose whole change is ``set_deltas`` (their rules, own addresses,
    mode and peers unchanged): what ``Compiler.host_deltas`` leaves grouped when asked to, so a
    caller builds a HostDelta only for the hosts it needs now."""

    hosts: tuple[str, ...]
    set_deltas: tuple[SetDelta, ...]


class DeltaBuilder:
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

    def set_deltas(self) -> tuple[SetDelta, ...]:
        out: list[SetDelta] = []
        for key in sorted(set(self.added) | set(self.removed), key=lambda k: (k[0], k[1].value)):
            add, rem = self.added.get(key, set()), self.removed.get(key, set())
            if add or rem:
                out.append(
                    SetDelta(key[0], key[1], tuple(sorted(add, key=_net_key)), tuple(sorted(rem, key=_net_key)))
                )
        return tuple(out)

