"""Presence: an agent whose long-poll a replica holds right now is online.

Before, an agent was online while its last request (a long-poll's arrival or answer) was younger
than ``offline_after``, so a long-poll could not be held longer than ``offline_after / 2`` and a
fleet renewed its polls every 20 s: 1,250 requests a second at 25,000 agents, which is what an
operator's change queued behind. Now the controller advertises a longer hold (``long_poll_hold``,
in every long-poll answer) and a held poll is presence, so the hold no longer depends on
``offline_after``.

How presence reaches every replica's liveness check: each replica counts the polls it holds
(:class:`HeldPolls`). Every ``offline_after / 3`` seconds it marks each agent it holds as heard
from *now* (:meth:`PolicyDistributor.agent_heartbeat`, in memory), and the next batched flush
writes those heartbeats (one statement for all of them), which the other replicas read with the
acks they already read (:meth:`PolicyDistributor.refresh_agents`). No write per renewal.

Bounds (seconds; ``offline_after`` 90 and a 120-s hold by default):

* an agent held by a live replica stays online (its stored heartbeat is at most a third of
  ``offline_after`` plus one flush interval old);
* a replica killed while it holds polls: the heartbeats it wrote are no newer than the kill, so
  its agents go offline on every other replica within ``offline_after`` (plus one liveness round,
  ``flush_interval``) of the kill, unless they long-poll another replica meanwhile (the real
  agent fails over at once) -- the same bound as before;
* an agent that closes its connection (process stopped, host shut down: FIN or RST) leaves
  presence at once (the route waits for ``http.disconnect`` beside the revision), so it goes
  offline within ``offline_after`` of leaving, sooner than before (then a 20-s poll could add 20 s);
* an agent whose host vanishes without closing (power cut, partition) stays present until its
  poll's hold ends: offline within ``hold + offline_after`` of vanishing (120 + 90 s), where it
  was ``20 + 90`` s with the old 20-s polls. That is the price of the longer hold, and it also
  delays a departure (``offline_grace``) by at most the hold. An operator who wants the old bound
  sets ``long_poll_hold`` to 20.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class HeldPolls:
    """The long-polls this replica holds, by agent id, and the periodic presence heartbeat."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval  # seconds between presence heartbeats (offline_after / 3)
        self._clock = clock
        self._held: dict[str, int] = {}  # agent id -> polls held (a reconnect may overlap the old one)
        self._next = clock() + interval

    def enter(self, agent_id: str) -> None:
        self._held[agent_id] = self._held.get(agent_id, 0) + 1

    def leave(self, agent_id: str) -> None:
        n = self._held.get(agent_id, 0) - 1
        if n > 0:
            self._held[agent_id] = n
        else:
            self._held.pop(agent_id, None)

    def holds(self, agent_id: str) -> bool:
        return agent_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def beat(self, heartbeat: Callable[[str], None], *, force: bool = False) -> int:
        """Every ``interval`` (or now with ``force``): ``heartbeat(agent_id)`` for every agent held;
        returns how many (0 when not due)."""
        now = self._clock()
        if not force and now < self._next:
            return 0
        self._next = now + self.interval
        for agent_id in self._held:  # on the event loop, which alone edits the dict
            heartbeat(agent_id)
        return len(self._held)
