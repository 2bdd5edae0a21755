"""One transaction's compiler mutations and their undo steps (:class:`CompilerTxn`).

:meth:`PolicyDistributor.transact <stockade.controller.services.distribution.PolicyDistributor.transact>`
hands one to its callback: workload writes are queued and reach the compiler as one batch, policy
swaps and NetworkPolicy changes go straight through, and every step records how to undo it, so a
failed commit puts the compiler back exactly where the database is.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from stockade.compiler import HostDelta
from stockade.compiler.changes import SetOnly
from stockade.compiler.delta import merge_host_deltas
from stockade.controller.services import replicas
from stockade.errors import Issue, ValidationError
from stockade.model.netpol import KubeNetworkPolicy
from stockade.model.workloads import WireGuardIdentity, Workload

# A batch of this many workload changes (the cluster sync's first list of a cluster, an import)
# grew the long-lived state by as many workloads: move it to the permanent GC generation, as the
# Compiler's build does. Otherwise the next full collection walks all of it, and at 10,000 pods
# that was a 0.3-3 s pause of the whole controller (bench/k8s_fanout.py, loaded machine) in the
# middle of the churn. Smaller batches do not freeze: each freeze also keeps whatever cyclic
# garbage the process holds at that moment (a few sessions' worth), so it must stay rare.
FREEZE_AFTER = 500

if TYPE_CHECKING:
    from stockade.controller.services.distribution import PolicyDistributor


@dataclass
class CompilerTxn:
    """Compiler mutations of one transaction, with their undo steps.

    Workload writes are queued and reach the compiler as ONE ``Compiler.apply_changes`` batch
    when the transaction's deltas are read (:attr:`deltas`: by ``transact`` before it bumps
    revisions, or by a scope check) or a policy swap must follow them: an import of 1,000
    workloads is one pass over the affected sets and one delta per host, not 1,000. The
    inventory map (``dist.workloads``) is updated at once, so later steps of the transaction
    read it as written.
    """

    dist: PolicyDistributor
    _deltas: dict[str, HostDelta] = field(default_factory=dict)
    undo: list[Callable[[], object]] = field(default_factory=list)
    compile_seconds: float = 0.0
    touched: set[str] = field(default_factory=set)  # workloads upserted or removed (for other replicas)
    agents: set[str] = field(default_factory=set)  # agent rows created or changed
    policy_replaced: bool = False
    label_keys_changed: bool = False
    departures_changed: bool = False

    def note(self) -> replicas.ChangeNote:
        return replicas.ChangeNote(tuple(sorted(self.touched)), tuple(sorted(self.agents)), self.policy_replaced,
                                   self.label_keys_changed, self.departures_changed)

    _pending: list[Workload | str] = field(default_factory=list)
    _before: dict[str, Workload | None] = field(default_factory=dict)  # compiler's view before the batch

    @property
    def deltas(self) -> dict[str, HostDelta]:
        """One delta per host changed so far in this transaction (applies queued writes first)."""
        self.flush()
        return self._deltas

    def _merge(self, deltas: list[HostDelta]) -> None:
        if not self._deltas:  # the usual case: one batch, one delta per host (a global change: 25,000)
            merged = {d.workload: d for d in deltas}
            if len(merged) == len(deltas):  # (else a host twice: merged one by one below)
                self._deltas.update(merged)
                return
        for d in deltas:
            prev = self._deltas.get(d.workload)
            self._deltas[d.workload] = d if prev is None else merge_host_deltas(prev, d)

    def flush(self, grouped: list[SetOnly] | None = None) -> None:
        """Hand the queued workload writes to the compiler as one batch. With ``grouped`` (a
        follower, :func:`.replicas.follow`), the hosts whose change is one label set's set
        deltas are left there instead of in :attr:`deltas` (only when no earlier step of this
        transaction changed any host, so no host can be in both)."""
        if not self._pending:
            return
        pending, before = self._pending, self._before
        self._pending, self._before = [], {}
        compiler = self.dist.compiler
        t0 = time.perf_counter()
        changes = compiler.apply_set_changes(pending)
        self._merge(compiler.host_deltas(changes, grouped if not self._deltas else None))
        self.compile_seconds += time.perf_counter() - t0
        if len(pending) >= FREEZE_AFTER:
            gc.freeze()  # see FREEZE_AFTER
        now = self.dist.workloads  # the inventory as the batch left it
        revert: list[Workload | str] = [
            old if old is not None else name for name, old in before.items() if old is not None or name in now
        ]
        self.undo.append(lambda: compiler.apply_changes(revert))

    def _queue(self, name: str, change: Workload | str, old: Workload | None) -> None:
        d = self.dist
        self._before.setdefault(name, old)
        self._pending.append(change)
        if isinstance(change, str):
            del d.workloads[name]
        else:
            d.workloads[name] = change

        def restore() -> None:
            if old is None:
                d.workloads.pop(name, None)
            else:
                d.workloads[name] = old

        self.undo.append(restore)

    def upsert_workload(self, w: Workload) -> None:
        d = self.dist
        old = d.workloads.get(w.name)
        if w.backend is not None and (old is None or old.backend != w.backend):
            check_backend_available(d, w)
        w = replace(w, wireguard=d.wg_keys.get(w.name))  # keys come from agents, never from bodies
        if w.name in d.departed:
            w = replace(w, interfaces=())  # offline past the grace period: out of peers' sets
        self._queue(w.name, w, d.workloads.get(w.name))
        self.touched.add(w.name)

    def set_wireguard_key(self, name: str, identity: WireGuardIdentity | None) -> None:
        """Register (or, None, revoke) ``name``'s WireGuard key: peers follow through the deltas."""
        d = self.dist
        before = d.wg_keys.get(name)
        if identity is None:
            d.wg_keys.pop(name, None)
        else:
            d.wg_keys[name] = identity

        def restore() -> None:
            if before is None:
                d.wg_keys.pop(name, None)
            else:
                d.wg_keys[name] = before

        self.undo.append(restore)
        current = d.workloads.get(name)
        if current is not None:
            self.upsert_workload(current)

    def remove_workload(self, name: str) -> None:
        old = self.dist.workloads.get(name)
        if old is not None:
            self._queue(name, name, old)
            self.touched.add(name)

    def replace_policy_objects(self, objects: Mapping[str, Mapping[str, Any]]) -> None:
        """Swap in new policy-kind bodies (a provisioned version's content), keeping inventory."""
        self.flush()  # the policy swap recompiles against the inventory as written so far
        d = self.dist
        old_objects = d.policy_objects
        t0 = time.perf_counter()
        self._merge(d.compiler.replace_policy(d.assemble(objects)))
        self.compile_seconds += time.perf_counter() - t0
        d.policy_objects = {k: dict(v) for k, v in objects.items()}
        self.policy_replaced = True

        def revert() -> None:
            d.compiler.replace_policy(d.assemble(old_objects))
            d.policy_objects = old_objects

        self.undo.append(revert)

    def set_network_policy(self, name: str, np: KubeNetworkPolicy | None) -> None:
        """Add, replace (``np``) or remove (None) one stored NetworkPolicy; diff only the pods it governs."""
        d = self.dist
        old = d.network_policies.get(name)
        if old == np:
            return

        def swap(value: KubeNetworkPolicy | None) -> list[HostDelta]:
            if value is None:
                d.network_policies.pop(name, None)
            else:
                d.network_policies[name] = value
            return d.compiler.replace_network_policies(tuple(sorted(d.network_policies.values())))

        t0 = time.perf_counter()
        self._merge(swap(np))
        self.compile_seconds += time.perf_counter() - t0
        self.undo.append(lambda: swap(old))

    def refresh_label_keys(self, keys: Mapping[str, Mapping[str, Any]]) -> None:
        old = self.dist.label_keys
        self.dist.label_keys = {k: dict(v) for k, v in keys.items()}
        self.label_keys_changed = True
        self.undo.append(lambda: setattr(self.dist, "label_keys", old))

    def rollback(self) -> None:
        self._pending.clear()  # never reached the compiler
        self._before.clear()
        for step in reversed(self.undo):
            step()
        self.undo.clear()


def check_backend_available(dist: PolicyDistributor, w: Workload) -> None:
    """Refuse (ValidationError on ``backend``) a backend setting the workload's agent said it
    cannot enforce with. Fail closed at the controller; the agent refuses it again if it comes
    anyway (an agent that has not reported yet is checked there)."""
    for live in dist.agents.values():
        if live.workload == w.name and live.backends and w.backend not in live.backends:
            have = ", ".join(live.backends)
            raise ValidationError([Issue("", 0, "backend", f"the agent of workload {w.name!r} cannot enforce "
                                         f"with {w.backend!r} (it has: {have})")])
