"""The outbox's heartbeat schedule when the controller counts long-polls as heartbeats (issue 18)."""

from __future__ import annotations

import threading
import time
from typing import Any

from stockade.agent import outbox as outbox_mod
from stockade.agent.backoff import BackoffPolicy
from stockade.agent.outbox import Outbox
from stockade.agent.transport import Heartbeat


class Beats:
    """The one client call the outbox makes here: heartbeats, counted."""

    def __init__(self) -> None:
        self.sent: list[Heartbeat] = []
        self.cond = threading.Condition()

    def heartbeat(self, beat: Heartbeat) -> None:
        with self.cond:
            self.sent.append(beat)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.sent) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


def _outbox(beats: Beats, seconds: float) -> Outbox:
    box = Outbox(lambda: Heartbeat(1, "full", 0), heartbeat_seconds=seconds,
                 backoff=BackoffPolicy(initial=0.01, maximum=0.05))
    box.start(beats)  # type: ignore[arg-type]
    return box


def test_without_long_polls_heartbeats_keep_their_period() -> None:
    beats = Beats()
    box = _outbox(beats, 0.05)
    try:
        assert beats.wait_for(4, 2.0)
    finally:
        box.stop()


def test_long_polls_that_count_as_heartbeats_put_the_periodic_one_off(monkeypatch: Any) -> None:
    monkeypatch.setattr(outbox_mod, "STATE_REPORT_SECONDS", 0.6)
    beats = Beats()
    box = _outbox(beats, 0.05)
    try:
        assert beats.wait_for(1)  # the first heartbeat goes at once
        box.alive()  # the controller took a long-poll as our heartbeat
        count = len(beats.sent)
        time.sleep(0.3)  # six periods: none sent
        assert len(beats.sent) == count
        assert beats.wait_for(count + 1, 2.0)  # one again after STATE_REPORT_SECONDS
    finally:
        box.stop()


def test_a_state_change_is_reported_at_once_even_after_a_long_poll(monkeypatch: Any) -> None:
    monkeypatch.setattr(outbox_mod, "STATE_REPORT_SECONDS", 60.0)
    beats = Beats()
    box = _outbox(beats, 60.0)
    try:
        assert beats.wait_for(1)
        box.heartbeat_now()  # e.g. the backend switched
        box.alive()  # a long-poll answer arriving meanwhile must not put that report off
        assert beats.wait_for(2, 2.0)
    finally:
        box.stop()


def test_a_long_poll_answered_before_the_first_heartbeat_does_not_put_it_off(monkeypatch: Any) -> None:
    """The first heartbeat carries the agent's state (backend, applied revision): a long-poll the
    controller counted as a heartbeat before the outbox's thread sent it must not postpone it by
    STATE_REPORT_SECONDS (seen in an e2e run under load: the backend unreported for minutes)."""
    monkeypatch.setattr(outbox_mod, "STATE_REPORT_SECONDS", 60.0)
    beats = Beats()
    box = Outbox(lambda: Heartbeat(1, "full", 0), heartbeat_seconds=60.0,
                 backoff=BackoffPolicy(initial=0.01, maximum=0.05))
    box.alive()  # the long-poll thread's answer came first
    box.start(beats)  # type: ignore[arg-type]
    try:
        assert beats.wait_for(1, 2.0), "the first heartbeat was put off"
    finally:
        box.stop()
