"""``host_state.policy_hash``: written after the fan-out, not in it.

The hash of a host's policy is read only at start-up (:meth:`.distribution.PolicyDistributor.load`
bumps a host whose stored hash differs from its recompiled policy, or is still empty), so writing it
late costs nothing but, after a crash in between, one revision more for the hosts not hashed yet.
Writing it at once cost the replica that made a global change its busiest seconds: hashing 25,000
policies (and building the histories of the hosts kept as pending steps, :mod:`.pending`) in the
flush thread, competing for the process's lock and GIL with the answers to the agents' long-polls.

So the flush loop writes the hashes once nothing was published for ``hash_after`` seconds
(``ControllerSettings.hash_delay``): not in a fan-out, nor in the next one right behind it. Under
constant churn it still writes every hash waiting for ``MAX_WAIT_FACTOR`` times that (a host bumped
again meanwhile keeps its first time). A host kept as pending steps has its history built here,
under the distributor's lock, a chunk at a time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from stockade.controller.services.host_state import policy_hash, write_hash_rows

if TYPE_CHECKING:
    from stockade.compiler.delta import HostHistory
    from stockade.controller.services.distribution import PolicyDistributor

KEEP_DIGESTS = 100_000  # hash parts kept between flushes at most (then forgotten at once)
BUILD_CHUNK = 256  # pending hosts built per hold of the distributor's lock
MAX_WAIT_FACTOR = 12  # under constant churn, hashes waiting this many hash_after are written anyway


def take_due(dist: PolicyDistributor, hash_after: float) -> dict[str, int]:
    """The hosts (-> revision) whose hash is due, taken out of ``dist.unhashed``: all of them once
    nothing was published for ``hash_after`` s, else those waiting ``MAX_WAIT_FACTOR`` times as
    long. Entries are in the order of their first wait, so the scan stops at the first one not due."""
    with dist.lock:
        if hash_after <= 0:
            due, dist.unhashed = dist.unhashed, {}
            dist.unhashed_at = {}
            return due
        now = time.monotonic()
        limit = now if now - dist.published_at >= hash_after else now - MAX_WAIT_FACTOR * hash_after
        due = {}
        for name, since in dist.unhashed_at.items():
            if since > limit:
                break
            due[name] = dist.unhashed.pop(name)
        for name in due:
            del dist.unhashed_at[name]
        return due


def write(dist: PolicyDistributor, hash_after: float) -> None:
    """Hash and store the due revisions that are still current (one statement)."""
    due = take_due(dist, hash_after)
    if not due:
        return
    if len(dist.digests) > KEEP_DIGESTS or len(dist.heads) > 2 * len(dist.revisions) + KEEP_DIGESTS:
        dist.digests, dist.heads = {}, {}  # parts no policy holds any more, hosts gone
    memo, heads = dist.digests, dist.heads
    current: list[tuple[str, int, HostHistory]] = []
    unbuilt: list[tuple[str, int]] = []
    for name, rev in sorted(due.items()):
        hist = dist.history.get(name)
        if hist is not None and hist.revision == rev:
            current.append((name, rev, hist))
        elif (steps := dist.pending.get(name)) is not None and steps.revision == rev:
            unbuilt.append((name, rev))
    for at in range(0, len(unbuilt), BUILD_CHUNK):
        with dist.lock:  # history_of builds from the compiler's current state: under the lock
            for name, rev in unbuilt[at:at + BUILD_CHUNK]:
                if dist.revisions.get(name) != rev:
                    continue  # bumped again meanwhile: that revision is hashed in its turn
                hist = dist.history_of(name)
                if hist is not None and hist.revision == rev:
                    current.append((name, rev, hist))
    params: list[dict[str, Any]] = [{"w": name, "r": rev, "h": policy_hash(hist.policy, memo, heads)}
                                    for name, rev, hist in sorted(current, key=lambda c: c[0])]
    if not params:
        return
    try:
        with dist.sessions.begin() as db:
            write_hash_rows(db, params)
    except BaseException:
        with dist.lock:  # the next flush tries again (unless the host was bumped meanwhile)
            now = time.monotonic() - hash_after
            for p in params:
                if p["w"] not in dist.unhashed:
                    dist.unhashed[p["w"]] = p["r"]
                    dist.unhashed_at.setdefault(p["w"], now)
        raise
