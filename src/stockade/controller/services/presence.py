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
* an agent that closes its connection (process stopped, host shut down: FIN or RST) is not
  present from then on: each presence heartbeat first asks every held poll whether its client
  is still connected (:meth:`HeldPolls.beat`), so its last heartbeat is no newer than its
  leaving and it goes offline within ``offline_after`` of leaving, as before (when a 20-s poll
  could add up to 20 s);
* an agent whose host vanishes without closing (power cut, partition) stays present until its
  poll's hold ends: offline within ``hold + offline_after`` of vanishing (120 + 90 s), where it
  was ``20 + 90`` s with the old 20-s polls. That is the price of the longer hold, and it also
  delays a departure (``offline_grace``) by at most the hold. An operator who wants the old bound
  sets ``long_poll_hold`` to 20.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

Probe = Callable[[], Awaitable[bool]]  # True once the poll's client has closed its connection


class HeldPolls:
    """The long-polls this replica holds, by agent id, and the periodic presence heartbeat."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval  # seconds between presence heartbeats (offline_after / 3)
        self._clock = clock
        # agent id -> the probes of its polls held here (a reconnect may overlap the old poll)
        self._held: dict[str, list[Probe]] = {}
        self._next = clock() + interval

    def enter(self, agent_id: str, probe: Probe) -> None:
        self._held.setdefault(agent_id, []).append(probe)

    def leave(self, agent_id: str, probe: Probe) -> bool:
        """Forget one poll; False when it was already dropped (its client had gone)."""
        probes = self._held.get(agent_id)
        if probes is None or probe not in probes:
            return False
        probes.remove(probe)
        if not probes:
            del self._held[agent_id]
        return True

    def holds(self, agent_id: str) -> bool:
        return agent_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    async def beat(self, heartbeat: Callable[[str], None], *, force: bool = False) -> int:
        """Every ``interval`` (or now with ``force``): ``heartbeat(agent_id)`` for every agent
        whose poll is held and still connected; a poll whose client has gone is dropped (not
        present from then on: its last heartbeat is no newer than its leaving). Returns the
        agents beaten (0 when not due). On the event loop, which alone edits the polls.

        Checking the connections here, a few thousand cheap probes every ``interval``, and not
        with a task per poll waiting for ``http.disconnect``: that task, created and cancelled
        for every poll answered, cost ~25 % of a 5,000-host fan-out's CPU (bench/README.md)."""
        now = self._clock()
        if not force and now < self._next:
            return 0
        self._next = now + self.interval
        beaten = 0
        for agent_id, probes in list(self._held.items()):
            present = False
            for probe in list(probes):
                if await probe():
                    self.leave(agent_id, probe)
                else:
                    present = True
            if present:
                heartbeat(agent_id)
                beaten += 1
        return beaten
