"""Hosts whose change is one label set's set members: kept as the label set's shared steps
(:class:`~stockade.compiler.delta.PendingSteps`), answered from them (an agent one step behind gets
the shared set deltas, :meth:`.distribution.PolicyDistributor.fetch_nowait`) and built into a
history only when an answer needs the host's own policy or its hash is due
(:meth:`.distribution.PolicyDistributor.history_of`). Hosts a listener needs at once (pods: their
node's answer is read on the event loop) are built now.

Both the replica that makes a change (:meth:`.distribution.PolicyDistributor.transact`, since
session 12) and the replicas that follow it (:func:`.replicas.follow`, session 11) split a change
this way: a global relabel of 25,000 hosts builds no HostDelta and no history per host before its
commit and its answers (only the relabelled host, whose rules changed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from stockade.compiler import HostDelta
from stockade.compiler.changes import SetOnly
from stockade.compiler.delta import PendingSteps
from stockade.compiler.ir import SetDelta

if TYPE_CHECKING:
    from stockade.controller.services.distribution import PolicyDistributor


def wanted_among(dist: PolicyDistributor, names: list[str]) -> set[str]:
    """Those of ``names`` that ``dist.wants``, in one pass per listener (not a call per host of a fan-out)."""
    return set().union(*({n for n in names if want(n)} for want in dist.wanted))


def split(dist: PolicyDistributor, grouped: list[SetOnly],
          deltas: dict[str, HostDelta]) -> dict[str, tuple[SetDelta, ...]]:
    """Hosts of ``grouped`` a listener needs at once get their HostDelta in ``deltas`` now; the
    others are returned with their label set's set deltas (never a host already in ``deltas``:
    ``Compiler.host_deltas`` leaves those out of the groups)."""
    later: dict[str, tuple[SetDelta, ...]] = {}
    wanted = wanted_among(dist, [name for group in grouped for name in group.hosts])
    for group in grouped:
        for name in group.hosts:
            if name in wanted:
                deltas[name] = HostDelta(name, dist.compiler.host_policy(name), False, group.set_deltas)
            else:
                later[name] = group.set_deltas
    return later


def steps(dist: PolicyDistributor, later: Mapping[str, tuple[SetDelta, ...]], revisions: Mapping[str, int],
          deltas: dict[str, HostDelta]) -> dict[str, PendingSteps]:
    """``later``'s hosts as pending steps up to their new revision (``revisions``); a host with no
    stored revision, or gone from the inventory, gets its HostDelta in ``deltas`` instead (the
    ordinary path decides what becomes of it)."""
    out: dict[str, PendingSteps] = {}
    for name, set_deltas in later.items():
        rev = revisions.get(name)
        if name not in dist.workloads or rev is None:
            deltas[name] = HostDelta(name, dist.compiler.host_policy(name), False, set_deltas)
            continue
        was = dist.pending.get(name)
        if was is not None:
            out[name] = was.then(rev, set_deltas, dist.history_limit)
        else:
            prev = dist.history.get(name)
            out[name] = PendingSteps.start(prev.revision if prev else None, rev, set_deltas, dist.history_limit)
    return out
