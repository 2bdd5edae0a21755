"""The delta protocol: how a host's policy moves from one revision to the next, in one place.

The compiler yields a :class:`~stockade.compiler.ir.HostDelta` per affected host and change:
either ``rules_changed`` (only a full HostPolicy will do) or set members removed and added
(:class:`~stockade.compiler.ir.SetDelta`, exact CIDRs: the removed ones are present, the added
ones absent). Everything that produces, carries or consumes those deltas uses this module:

* :func:`compose_set_deltas` / :func:`merge_host_deltas` chain deltas (several changes in one
  controller transaction; an agent several revisions behind);
* :class:`HostHistory` is one host's published revisions: its current HostPolicy and the last
  ``limit`` steps. :meth:`HostHistory.update_since` answers an agent holding revision N with
  the composed delta from N, or the full policy when a step changed rules or the history no
  longer reaches back to N;
* :class:`PolicyUpdate` is that answer, and :func:`policy_update_to_dict` /
  :func:`policy_update_from_dict` its one wire codec
  (``{revision, full: HostPolicy | null, base: N | null, set_deltas: [{name, family, added,
  removed}], peers?: {set: [peer], removed: [workload]}}``); the decoder names the bad field in
  a :class:`~stockade.errors.ValidationError`;
* **peer deltas** (:class:`~stockade.compiler.ir.PeerDelta`): a host's WireGuard peers changed
  (a key rotated, a peer re-addressed, came or went) while its rules did not - rendered rules
  never name a peer, so :meth:`HostPolicy.rules_key` leaves peers out. The history diffs the
  two policies' peers (:func:`peer_delta`, O(peers)); the agent applies it over the WireGuard
  control socket, one peer at a time, without re-rendering or reloading its ruleset. A peer
  delta carries whole peers keyed by workload (set / remove), so composition is "last one
  wins" and applying is exact; its order is guarded by the base revision like set deltas;
* :func:`apply_set_deltas` / :func:`apply_update` are the one *strict* apply: a delta for an
  unknown set, removing an absent member, adding a present one, or a delta whose base is not
  the revision in force raises :class:`~stockade.errors.ConflictError` (the agent then fetches
  the full policy). No silent repair: a delta that does not fit means a producer bug or a
  missed revision, and a full policy is the only safe answer.

Pure: no I/O, frozen values (a :class:`HostHistory` is replaced, never edited, so readers
without a lock always see a consistent one).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from stockade.compiler.ir import (
    AddressSet,
    HostDelta,
    HostPolicy,
    PeerDelta,
    SetDelta,
    WireGuardConfig,
    WireGuardPeer,
    host_policy_from_dict,
    host_policy_to_dict,
    peer_from_dict,
    peer_to_dict,
    unchecked,
    wire_key,
)
from stockade.errors import ConflictError, Issue, ValidationError
from stockade.model.addresses import Family, IPNetwork

SetKey = tuple[str, Family]
NO_PEERS = PeerDelta()  # frozen: one shared empty peer delta


def _net_key(n: IPNetwork) -> tuple[int, int]:
    return int(n.network_address), n.prefixlen


def _label(key: SetKey) -> str:
    return f"{key[0]} ({key[1].name})"


# ---- composing ----------------------------------------------------------------------------------


def compose_set_deltas(first: Iterable[SetDelta], then: Iterable[SetDelta]) -> tuple[SetDelta, ...]:
    """One delta with the effect of ``first`` followed by ``then`` (sorted, empty sets dropped).

    Raises :class:`ConflictError` when ``then`` cannot follow ``first`` (it removes a member
    ``first`` already removed, or adds one ``first`` already added).
    """
    added: dict[SetKey, set[IPNetwork]] = {}
    removed: dict[SetKey, set[IPNetwork]] = {}
    for d in (*first, *then):
        key = (d.name, d.family)
        add, rem = added.setdefault(key, set()), removed.setdefault(key, set())
        for n in d.removed:
            if n in add:
                add.discard(n)
            elif n in rem:
                raise ConflictError(f"set {_label(key)}: {n} removed twice")
            else:
                rem.add(n)
        for n in d.added:
            if n in rem:
                rem.discard(n)
            elif n in add:
                raise ConflictError(f"set {_label(key)}: {n} added twice")
            else:
                add.add(n)
    return tuple(
        SetDelta(key[0], key[1], tuple(sorted(added[key], key=_net_key)), tuple(sorted(removed[key], key=_net_key)))
        for key in sorted(added, key=lambda k: (k[0], k[1].value))
        if added[key] or removed[key]
    )


def merge_host_deltas(earlier: HostDelta, later: HostDelta) -> HostDelta:
    """Two successive deltas of one host as one (the policy is the later one's)."""
    if later.policy is None:
        return later
    rules_changed = earlier.rules_changed or later.rules_changed or earlier.policy is None
    deltas = () if rules_changed else compose_set_deltas(earlier.set_deltas, later.set_deltas)
    peers = not rules_changed and (earlier.peers_changed or later.peers_changed)
    return HostDelta(later.workload, later.policy, rules_changed, deltas, peers)


def diff_sets(old: tuple[AddressSet, ...], new: tuple[AddressSet, ...]) -> tuple[SetDelta, ...]:
    """Element changes turning ``old`` sets into ``new`` ones (same names and families)."""
    old_by = {(s.name, s.family): set(s.members) for s in old}
    out: list[SetDelta] = []
    for s in new:
        prev = old_by.get((s.name, s.family), set())
        cur = set(s.members)
        if prev != cur:
            out.append(
                SetDelta(s.name, s.family, tuple(sorted(cur - prev, key=_net_key)),
                         tuple(sorted(prev - cur, key=_net_key)))
            )
    return tuple(sorted(out))


def delta_between(old: HostPolicy, new: HostPolicy) -> tuple[SetDelta, ...] | None:
    """The set delta turning ``old`` into ``new``, or None when more than set members differ.

    For producers without an incremental compiler at hand (test doubles); the controller uses
    the deltas the compiler computed.
    """
    return diff_sets(old.sets, new.sets) if old.rules_key() == new.rules_key() else None


def peer_delta(old: WireGuardConfig | None, new: WireGuardConfig | None) -> PeerDelta:
    """The peers set or removed from ``old`` to ``new`` (empty when they are the same)."""
    if old is new:
        return NO_PEERS  # (frozen: one shared empty delta, not one per host of a fan-out)
    old_by = {p.workload: p for p in old.peers} if old is not None else {}
    new_by = {p.workload: p for p in new.peers} if new is not None else {}
    return PeerDelta(tuple(p for w, p in sorted(new_by.items()) if old_by.get(w) != p),
                     tuple(sorted(set(old_by) - set(new_by))))


def compose_peer_deltas(first: PeerDelta, then: PeerDelta) -> PeerDelta:
    """One peer delta with the effect of ``first`` followed by ``then`` (the later entry wins)."""
    state: dict[str, WireGuardPeer | None] = {}
    for d in (first, then):
        state.update({w: None for w in d.removed})
        state.update({p.workload: p for p in d.upserted})
    return PeerDelta(tuple(p for _, p in sorted(state.items()) if p is not None),
                     tuple(sorted(w for w, p in state.items() if p is None)))


def apply_peer_delta(wg: WireGuardConfig | None, delta: PeerDelta) -> WireGuardConfig | None:
    """``wg`` with ``delta``'s peers set and removed; ConflictError when this host has no tunnel."""
    if not delta:
        return wg
    if wg is None:
        raise ConflictError("peer delta for a host without a WireGuard tunnel")
    by = {p.workload: p for p in wg.peers}
    for w in delta.removed:
        by.pop(w, None)
    by.update({p.workload: p for p in delta.upserted})
    return replace(wg, peers=tuple(by[w] for w in sorted(by)))


# ---- applying -----------------------------------------------------------------------------------


def apply_set_deltas(hp: HostPolicy, deltas: Iterable[SetDelta]) -> HostPolicy:
    """``hp`` with each delta's members removed, then added. Strict (:class:`ConflictError`):
    a delta for a set ``hp`` lacks, two deltas for one set, removing an absent member or
    adding a present one."""
    index = {(s.name, s.family): i for i, s in enumerate(hp.sets)}
    sets = list(hp.sets)
    seen: set[SetKey] = set()
    for d in deltas:
        key = (d.name, d.family)
        i = index.get(key)
        if i is None:
            raise ConflictError(f"set delta for unknown set {_label(key)}")
        if key in seen:
            raise ConflictError(f"two set deltas for set {_label(key)}")
        seen.add(key)
        if not d.added and not d.removed:
            continue
        members = set(sets[i].members)
        absent = [str(n) for n in d.removed if n not in members]
        if absent:
            raise ConflictError(f"set {_label(key)}: cannot remove absent members {', '.join(absent)}")
        members.difference_update(d.removed)
        present = [str(n) for n in d.added if n in members]
        if present or len(set(d.added)) != len(d.added):
            raise ConflictError(f"set {_label(key)}: cannot add present members {', '.join(present) or 'twice'}")
        members.update(d.added)
        sets[i] = replace(sets[i], members=tuple(sorted(members, key=_net_key)))
    return replace(hp, sets=tuple(sets))


class UpdateKind(Enum):
    FULL = "full"  # a complete HostPolicy
    DELTA = "delta"  # address-set member and tunnel peer changes relative to ``base``
    UNCHANGED = "unchanged"  # the agent already holds this revision


@dataclass(frozen=True)
class PolicyUpdate:
    """What a host receives for revision ``revision``: the full policy, a delta, or nothing."""

    revision: int
    kind: UpdateKind
    policy: HostPolicy | None = None  # FULL only
    base: int | None = None  # DELTA only: the revision the deltas start from
    set_deltas: tuple[SetDelta, ...] = ()  # DELTA only
    peer_delta: PeerDelta = NO_PEERS  # DELTA only: WireGuard peers set / removed

    @staticmethod
    def full(revision: int, policy: HostPolicy) -> PolicyUpdate:
        return PolicyUpdate(revision, UpdateKind.FULL, policy=policy)

    @staticmethod
    def delta(base: int, revision: int, set_deltas: tuple[SetDelta, ...],
              peers: PeerDelta = NO_PEERS) -> PolicyUpdate:
        return PolicyUpdate(revision, UpdateKind.DELTA, base=base, set_deltas=set_deltas, peer_delta=peers)

    @staticmethod
    def unchanged(revision: int) -> PolicyUpdate:
        return PolicyUpdate(revision, UpdateKind.UNCHANGED)


def apply_update(current: HostPolicy | None, applied: int, update: PolicyUpdate) -> HostPolicy | None:
    """The policy after ``update``, for a host holding ``current`` at revision ``applied``.

    None for UNCHANGED. A DELTA must start from ``applied`` and fit ``current`` exactly
    (:func:`apply_set_deltas`), else :class:`ConflictError`: fetch the full policy.
    """
    if update.kind is UpdateKind.UNCHANGED:
        return None
    if update.kind is UpdateKind.FULL:
        assert update.policy is not None
        return update.policy
    if current is None:
        raise ConflictError(f"delta from revision {update.base}, but no policy is in force")
    if update.base != applied:
        raise ConflictError(f"delta from revision {update.base}, but revision {applied} is in force")
    hp = apply_set_deltas(current, update.set_deltas)
    if update.peer_delta:
        hp = replace(hp, wireguard=apply_peer_delta(hp.wireguard, update.peer_delta))
    return hp


# ---- history ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Revision ``base`` -> ``revision``: set deltas (None when rules changed: full only) and peers."""

    base: int
    revision: int
    set_deltas: tuple[SetDelta, ...] | None
    peer_delta: PeerDelta = NO_PEERS


@dataclass(frozen=True)
class HostHistory:
    """One host's current policy at ``revision`` and the last ``limit`` steps that led there."""

    revision: int
    policy: HostPolicy
    steps: tuple[Step, ...] = ()
    limit: int = 8

    @staticmethod
    def begin(revision: int, policy: HostPolicy, limit: int = 8) -> HostHistory:
        return HostHistory(revision, policy, (), limit)

    def after(self, delta: HostDelta, revision: int) -> HostHistory | None:
        """This history once ``delta`` is published as ``revision``; None if it changes nothing.

        A revision that does not follow this one (``revision != self.revision + 1``) starts a
        new history: older agents get the full policy.
        """
        if delta.policy is None:
            raise ValueError(f"workload {delta.workload!r} is gone: no history after it")
        step_deltas: tuple[SetDelta, ...] | None = None if delta.rules_changed else delta.set_deltas
        peers = NO_PEERS
        if step_deltas is not None:
            old_wg, new_wg = self.policy.wireguard, delta.policy.wireguard
            if (old_wg is None) != (new_wg is None) or (old_wg and new_wg and old_wg.listen_port != new_wg.listen_port):
                step_deltas = None  # a tunnel came, went or moved port: the rules differ
            else:
                peers = peer_delta(old_wg, new_wg)
        if step_deltas == () and not peers:
            if delta.policy == self.policy:
                return None  # the changes of one transaction cancelled out
            step_deltas = None  # something beyond set members and peers moved: only a full policy is safe
        if revision != self.revision + 1:
            return HostHistory(revision, delta.policy, (), self.limit)
        steps = (*self.steps, Step(self.revision, revision, step_deltas, peers))[-self.limit :]
        return HostHistory(revision, delta.policy, steps, self.limit)

    def update_since(self, since: int | None) -> PolicyUpdate:
        """The answer for a host holding ``since`` (None: nothing, send everything)."""
        if since == self.revision:
            return PolicyUpdate.unchanged(self.revision)
        if since is None or not self.steps or not self.steps[0].base <= since < self.revision:
            return PolicyUpdate.full(self.revision, self.policy)
        chain = [s for s in self.steps if s.base >= since]
        composed: tuple[SetDelta, ...] = ()
        peers = PeerDelta()
        for i, step in enumerate(chain):
            if step.set_deltas is None:
                return PolicyUpdate.full(self.revision, self.policy)
            composed = step.set_deltas if i == 0 else compose_set_deltas(composed, step.set_deltas)
            peers = compose_peer_deltas(peers, step.peer_delta)
        return PolicyUpdate.delta(since, self.revision, composed, peers)



@dataclass(frozen=True)
class PendingSteps:
    """Set-member steps published after a host's last built :class:`HostHistory`, not built yet.

    A replica following a fan-out that another replica computed need not build a history for
    every host at once: for a host none of its polls holds, it keeps the steps (the set deltas
    the label set shares) and builds the history when someone asks (:meth:`onto`), from the
    policy the compiler holds then. Only for plain set-member steps (never a rules change and
    never a host with WireGuard peers: those are built at once), so the result is exactly what
    :meth:`HostHistory.after` would have given step by step. ``base``: the revision of the
    history these steps start from (None: none); ``restart``: a revision was skipped, so older
    agents get the full policy, as :meth:`HostHistory.after` does.
    """

    base: int | None
    revision: int
    steps: tuple[Step, ...]
    restart: bool

    @staticmethod
    def start(base: int | None, revision: int, set_deltas: tuple[SetDelta, ...], limit: int) -> PendingSteps:
        """The first step after the history at ``base`` (None: no history: the step starts one)."""
        if base is None:
            return PendingSteps(None, revision, (), True)
        return PendingSteps._of(base, base, (), False, set_deltas, limit, revision)

    def then(self, revision: int, set_deltas: tuple[SetDelta, ...], limit: int) -> PendingSteps:
        """These steps and one more, published as ``revision``."""
        return PendingSteps._of(self.base, self.revision, self.steps, self.restart, set_deltas, limit, revision)

    @staticmethod
    def _of(base: int | None, last: int, steps: tuple[Step, ...], restart: bool, set_deltas: tuple[SetDelta, ...],
            limit: int, revision: int | None = None) -> PendingSteps:
        """``steps`` (ending at ``last``) and one more to ``revision`` (default ``last + 1``); one
        per host a follower does not build, so made without the dataclasses' ``__init__``."""
        if not set_deltas:
            raise ValueError("a pending step moves set members")
        revision = last + 1 if revision is None else revision
        if revision != last + 1:  # a revision skipped: nothing older leads here
            return PendingSteps(base, revision, (), True)
        step = unchecked(Step, {"base": last, "revision": revision, "set_deltas": set_deltas, "peer_delta": NO_PEERS})
        return unchecked(PendingSteps, {"base": base, "revision": revision, "restart": restart,
                                        "steps": (*steps, step)[-limit:] if steps else (step,)})

    def after(self, history: HostHistory | None, delta: HostDelta, revision: int, limit: int) -> HostHistory:
        """These steps, then ``delta`` published as ``revision``, built onto ``history`` (the one
        at ``base``): for a host whose pending steps were not built when its policy changed
        again (the policy of :attr:`revision` is gone from the compiler by then). Anything but
        set members moving answers older agents with the full policy."""
        if delta.policy is None:
            raise ValueError(f"workload {delta.workload!r} is gone: no history after it")
        if delta.rules_changed or delta.peers_changed or not delta.set_deltas or delta.policy.wireguard is not None:
            return HostHistory(revision, delta.policy, (), limit)
        return self.then(revision, delta.set_deltas, limit).onto(history, delta.policy, limit)

    def update_since(self, history: HostHistory | None, since: int | None, limit: int) -> PolicyUpdate | None:
        """The answer :meth:`onto` would give an agent holding ``since``, without building it:
        unchanged, or the composed set deltas (the label set's shared tuples, so a fan-out's
        answers share one delta); None when the answer needs the host's own policy (a full
        one, or steps that do not chain onto ``history``, the one at :attr:`base`): build it."""
        if since == self.revision:
            return PolicyUpdate.unchanged(self.revision)
        if since is None or self.restart or history is None or history.revision != self.base:
            return None
        if history.policy.wireguard is not None:
            return None  # onto() keeps no steps for a host with a tunnel
        steps = (*history.steps, *self.steps)[-limit:]
        if not steps[0].base <= since < self.revision:
            return None
        composed: tuple[SetDelta, ...] = ()
        peers = PeerDelta()
        for i, step in enumerate(s for s in steps if s.base >= since):
            if step.set_deltas is None:
                return None
            composed = step.set_deltas if i == 0 else compose_set_deltas(composed, step.set_deltas)
            peers = compose_peer_deltas(peers, step.peer_delta)
        return PolicyUpdate.delta(since, self.revision, composed, peers)

    def onto(self, history: HostHistory | None, policy: HostPolicy, limit: int) -> HostHistory:
        """The history these steps lead to from ``history`` (the one at ``base``), ending at
        ``policy`` (the host's policy at :attr:`revision`). Steps are kept only where they are
        known to chain; anything else answers older agents with the full policy."""
        if policy.wireguard is not None or (history is not None and history.policy.wireguard is not None):
            return HostHistory(self.revision, policy, (), limit)  # peers are diffed by HostHistory.after only
        if self.restart or history is None or history.revision != self.base:
            return HostHistory(self.revision, policy, self.steps[-limit:], limit)
        return HostHistory(self.revision, policy, (*history.steps, *self.steps)[-limit:], limit)


# ---- wire codec ---------------------------------------------------------------------------------


def set_delta_to_dict(d: SetDelta) -> dict[str, Any]:
    return {
        "name": d.name,
        "family": d.family.value,
        "added": [str(n) for n in d.added],
        "removed": [str(n) for n in d.removed],
    }


def policy_update_to_dict(update: PolicyUpdate) -> dict[str, Any]:
    """The wire form: ``{revision, full, base, set_deltas}`` (JSON-ready)."""
    if update.kind is UpdateKind.FULL:
        assert update.policy is not None
        return {"revision": update.revision, "full": host_policy_to_dict(update.policy), "base": None,
                "set_deltas": []}
    if update.kind is UpdateKind.UNCHANGED:
        return {"revision": update.revision, "full": None, "base": update.revision, "set_deltas": []}
    out: dict[str, Any] = {"revision": update.revision, "full": None, "base": update.base,
                           "set_deltas": [set_delta_to_dict(d) for d in update.set_deltas]}
    if update.peer_delta:  # only when peers changed: agents before peer deltas never see the field
        out["peers"] = {"set": [peer_to_dict(p) for p in update.peer_delta.upserted],
                        "removed": list(update.peer_delta.removed)}
    return out


WIRE_FIELDS = ("revision", "full", "base", "set_deltas", "peers")


def _malformed(source: str, field: str, message: str) -> ValidationError:
    return ValidationError([Issue(source, 0, field, message)])


def _int(d: Mapping[str, Any], key: str, source: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _malformed(source, key, f"expected a non-negative integer, got {value!r}")
    return value


def _networks(value: Any, field: str, family: Family, source: str) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise _malformed(source, field, "expected a list of CIDRs")
    out: list[IPNetwork] = []
    for i, text in enumerate(value):
        try:
            n = ipaddress.ip_network(text)
        except (TypeError, ValueError) as exc:
            raise _malformed(source, f"{field}[{i}]", f"not a CIDR: {text!r}") from exc
        if n.version != family.value:
            raise _malformed(source, f"{field}[{i}]", f"{n} is not IPv{family.value}")
        out.append(n)
    return tuple(out)


def set_delta_from_dict(d: Any, field: str = "set_deltas", source: str = "controller") -> SetDelta:
    if not isinstance(d, dict):
        raise _malformed(source, field, "expected an object")
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise _malformed(source, f"{field}.name", "expected a set name")
    try:
        family = Family(d.get("family"))
    except ValueError as exc:
        raise _malformed(source, f"{field}.family", f"expected 4 or 6, got {d.get('family')!r}") from exc
    added = _networks(d.get("added", []), f"{field}.added", family, source)
    removed = _networks(d.get("removed", []), f"{field}.removed", family, source)
    return SetDelta(name, family, added, removed)


class SharedDecode:
    """What one answer's decoding has made so far, by wire content: a node's answer carries the
    same set delta (and, in full policies, the same address sets) for many pods, encoded once by
    the controller; decoded through one of these they are parsed and checked once and every pod
    gets the same frozen object (equal to what its own decode would give). Per answer, not kept."""

    __slots__ = ("address_sets", "set_deltas")

    def __init__(self) -> None:
        self.set_deltas: dict[object, SetDelta] = {}
        self.address_sets: dict[object, AddressSet] = {}

    def set_delta(self, d: Any, field: str, source: str) -> SetDelta:
        key = wire_key(d.get("name"), d.get("family"), d.get("added", []), d.get("removed", [])) \
            if isinstance(d, dict) else None
        if key is None:  # malformed or not plain text: decoded (and refused) on its own
            return set_delta_from_dict(d, field, source)
        hit = self.set_deltas.get(key)
        if hit is None:
            hit = self.set_deltas[key] = set_delta_from_dict(d, field, source)
        return hit


def policy_update_from_dict(d: Any, source: str = "controller", shared: SharedDecode | None = None) -> PolicyUpdate:
    """Decode the wire form; :class:`ValidationError` naming the field if it is malformed.

    ``full`` set: FULL. Else ``base`` set: DELTA from ``base`` (UNCHANGED when ``base`` is the
    revision and there are no deltas). Neither: UNCHANGED.
    """
    if not isinstance(d, dict):
        raise _malformed(source, "", "expected a JSON object")
    unknown = sorted(str(k) for k in d if k not in WIRE_FIELDS)
    if unknown:
        raise _malformed(source, unknown[0], f"unknown field (expected {', '.join(WIRE_FIELDS)})")
    revision = _int(d, "revision", source)
    full = d.get("full")
    if full is not None:
        if not isinstance(full, dict):
            raise _malformed(source, "full", "expected a HostPolicy object")
        try:
            return PolicyUpdate.full(revision, host_policy_from_dict(
                full, None if shared is None else shared.address_sets))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise _malformed(source, "full", f"not a HostPolicy: {exc!r}") from exc
    if d.get("base") is None:
        return PolicyUpdate.unchanged(revision)
    base = _int(d, "base", source)
    raw = d.get("set_deltas", [])
    if not isinstance(raw, list):
        raise _malformed(source, "set_deltas", "expected a list")
    if base > revision:
        raise _malformed(source, "base", f"base {base} is after revision {revision}")
    peers = peer_delta_from_dict(d.get("peers"), source)
    if base == revision:
        if raw or peers:
            raise _malformed(source, "set_deltas", "a delta from a revision to itself must be empty")
        return PolicyUpdate.unchanged(revision)
    if shared is None:
        deltas = tuple(set_delta_from_dict(x, f"set_deltas[{i}]", source) for i, x in enumerate(raw))
    else:
        deltas = tuple(shared.set_delta(x, f"set_deltas[{i}]", source) for i, x in enumerate(raw))
    return PolicyUpdate.delta(base, revision, deltas, peers)


def peer_delta_from_dict(d: Any, source: str = "controller") -> PeerDelta:
    """``{set: [peer], removed: [workload]}`` (absent: no peer change); ValidationError naming the field."""
    if d is None:
        return PeerDelta()
    if not isinstance(d, dict) or set(d) - {"set", "removed"}:
        raise _malformed(source, "peers", "expected an object with 'set' and 'removed'")
    raw_set, raw_removed = d.get("set", []), d.get("removed", [])
    if not isinstance(raw_set, list) or not isinstance(raw_removed, list):
        raise _malformed(source, "peers", "'set' and 'removed' must be lists")
    upserted: list[WireGuardPeer] = []
    for i, p in enumerate(raw_set):
        field = f"peers.set[{i}]"
        if not isinstance(p, dict):
            raise _malformed(source, field, "expected a peer object")
        try:
            upserted.append(peer_from_dict(p, field))
        except ValidationError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise _malformed(source, field, f"not a WireGuard peer: {exc!r}") from exc
    if not all(isinstance(w, str) and w for w in raw_removed):
        raise _malformed(source, "peers.removed", "expected workload names")
    names = [p.workload for p in upserted] + list(raw_removed)
    if len(set(names)) != len(names):
        raise _malformed(source, "peers", "a workload appears twice")
    return PeerDelta(tuple(sorted(upserted, key=lambda p: p.workload)), tuple(sorted(raw_removed)))
