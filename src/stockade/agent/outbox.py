"""Everything the agent sends on its own initiative: events, host reports, heartbeats.

One daemon thread drains a bounded queue of :class:`AgentEvent` (oldest dropped first
when the controller has been away long enough to fill it), the latest
:class:`HostReport` (a newer report replaces an unsent one) and a periodic
:class:`Heartbeat`. While the controller is unreachable it backs off with jitter and
keeps everything for later; the enforce loop never waits on it.

A controller that counts each long-poll as the agent's heartbeat says so in its answers; the
enforce loop then calls :meth:`Outbox.alive` and the periodic heartbeat waits up to
``STATE_REPORT_SECONDS`` (one request per agent per poll instead of two; a state change is
still reported at once through :meth:`Outbox.heartbeat_now`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from stockade.agent.backoff import Backoff, BackoffPolicy
from stockade.agent.host import HostReport
from stockade.agent.transport import AgentEvent, ControllerClient, ControllerUnreachableError, Heartbeat
from stockade.errors import StockadeError

log = logging.getLogger("stockade.agent")
MAX_QUEUED_EVENTS = 1000
STATE_REPORT_SECONDS = 300.0  # a heartbeat at least this often while long-polls keep the agent online


class Outbox:
    def __init__(
        self,
        heartbeat: Callable[[], Heartbeat],
        *,
        heartbeat_seconds: float,
        backoff: BackoffPolicy,
    ) -> None:
        self._client: ControllerClient | None = None
        self._heartbeat = heartbeat
        self._heartbeat_seconds = heartbeat_seconds
        self._backoff = Backoff(backoff)
        self._events: collections.deque[AgentEvent] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self._host: HostReport | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._next_beat = 0.0
        # heartbeat_now() asked for one: alive() must not put it off. True from the start: the first
        # heartbeat reports the agent's state (its backend, what it applied), and a long-poll answered
        # before the sending thread got to it must not put that off for STATE_REPORT_SECONDS
        self._beat_due = True
        self.sent_events: int = 0

    # ---- producers (any thread) ---------------------------------------------------
    def event(self, ev: AgentEvent) -> None:
        with self._cond:
            self._events.append(ev)
            self._cond.notify()

    def host(self, report: HostReport) -> None:
        with self._cond:
            self._host = report
            self._cond.notify()

    def heartbeat_now(self) -> None:
        with self._cond:
            self._next_beat = 0.0
            self._beat_due = True
            self._cond.notify()

    def alive(self) -> None:
        """The controller counted a long-poll as our heartbeat: the periodic one can wait."""
        with self._cond:
            if not self._beat_due:
                later = time.monotonic() + max(self._heartbeat_seconds, STATE_REPORT_SECONDS)
                self._next_beat = max(self._next_beat, later)

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._events) + (self._host is not None)

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self, client: ControllerClient) -> None:
        self._client = client
        self._thread = threading.Thread(target=self._run, name="stockade-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is queued (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._events or self._host is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    # ---- the sending thread ----------------------------------------------------------------
    def _run(self) -> None:
        client = self._client
        assert client is not None
        while True:
            with self._cond:
                while not self._stopping and not self._events and self._host is None:
                    wait = self._next_beat - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopping:
                    return
                events = list(self._events)
                host = self._host
            try:
                if host is not None:
                    client.report_host(host)
                    with self._cond:
                        if self._host is host:
                            self._host = None
                if events:
                    client.send_events(events)
                    with self._cond:
                        self._drop_sent(events)
                        self.sent_events += len(events)
                        self._cond.notify_all()
                if time.monotonic() >= self._next_beat:
                    with self._cond:
                        self._beat_due = False
                    client.heartbeat(self._heartbeat())
                    with self._cond:
                        if not self._beat_due:  # else asked for again while this one was sent
                            self._next_beat = time.monotonic() + self._heartbeat_seconds
                self._backoff.reset()
            except ControllerUnreachableError as exc:
                self._pause(self._backoff.next_delay(), f"controller unreachable: {exc}")
            except StockadeError as exc:
                # Refused (auth, validation): drop what was refused rather than loop on it.
                log.warning("controller refused agent report: %s", exc)
                with self._cond:
                    if host is not None and self._host is host:
                        self._host = None
                    self._drop_sent(events)
                    self._cond.notify_all()
                self._pause(self._backoff.next_delay(), "")

    def _drop_sent(self, sent: list[AgentEvent]) -> None:
        # Only the events actually sent: the queue may have dropped its oldest meanwhile.
        for ev in sent:
            if self._events and self._events[0] is ev:
                self._events.popleft()

    def _pause(self, seconds: float, why: str) -> None:
        if why:
            log.info("outbox: %s; retrying in %.2fs", why, seconds)
        with self._cond:
            if not self._stopping:
                self._cond.wait(seconds)
