"""A held long-poll is presence (issue 18): an agent whose poll the controller holds stays online
however long the hold, and goes offline within ``offline_after`` once the poll ends.

The same scenario on SQLite and PostgreSQL, through the real app with its background flush and
liveness jobs running (``offline_after`` 1.5 s, so a third of it, the presence interval, is 0.5 s).
The cross-replica bound (a replica killed while it holds polls) is in
``tests/replicas/test_presence_replicas.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi.testclient import TestClient
from tests.api.conftest import Api, make_settings
from tests.api.test_agents import enroll
from tests.asyncutil import run_async

from stockade.controller.app import create_app
from stockade.controller.services.presence import HeldPolls

OFFLINE_AFTER = 1.5


def _status(api: Api, aid: str) -> str:
    return str(api.ok("GET", f"/agents/{aid}")["status"])


def _events(api: Api, action: str) -> int:
    page = api.ok("GET", "/events", params={"action": action})
    items = page["items"] if isinstance(page, dict) else page
    return len(items)


def test_a_held_long_poll_keeps_its_agent_online_past_offline_after(database_url: str) -> None:
    app = create_app(make_settings(database_url, offline_after=OFFLINE_AFTER, flush_interval=0.1,
                                   long_poll_hold=8.0, long_poll_max=8.0))
    with TestClient(app) as client:
        api = Api(client, app.state.controller)
        api.ok("POST", "/pairing-profiles", 201, json={"name": "p"})
        agent = enroll(api, api.ok("POST", "/pairing-profiles/p/codes", 201)["code"], "h", "10.9.0.1").json()
        aid, token = agent["agent_id"], api.headers(agent["token"])
        first = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token, params={"after": 0, "timeout": 0})
        assert first["hold"] == 8.0 and first["heartbeat"] is True
        held: dict[str, Any] = {}

        def poll() -> None:  # nothing changes: held for the whole 5 s it asks for
            held["answer"] = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token,
                                    params={"after": first["revision"], "timeout": 5.0})
            held["at"] = time.monotonic()

        th = threading.Thread(target=poll)
        th.start()
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 4.0:  # well past offline_after, the poll still held
                assert _status(api, aid) == "online", f"offline {time.monotonic() - t0:.1f} s into a held poll"
                time.sleep(0.25)
        finally:
            th.join(10)
        assert held["answer"]["changed"] is False
        assert _events(api, "agent.offline") == 0  # the liveness job never saw it offline either
        # the poll is over and no other comes: offline within offline_after (+ a liveness round)
        deadline = held["at"] + OFFLINE_AFTER + 1.0
        while _status(api, aid) == "online":
            assert time.monotonic() < deadline, "still online after the poll ended"
            time.sleep(0.05)
        assert time.monotonic() - held["at"] >= OFFLINE_AFTER - 0.3  # not before: the answer was a heartbeat


def test_the_hold_must_fit_the_longest_poll() -> None:
    import pytest

    from stockade.errors import ValidationError

    with pytest.raises(ValidationError, match="long_poll_hold"):
        make_settings("sqlite://", long_poll_hold=400.0)
    with pytest.raises(ValidationError, match="long_poll_hold"):
        make_settings("sqlite://", long_poll_hold=0.0)


def test_held_polls_beat_each_interval_and_drop_polls_whose_client_left() -> None:
    now = [100.0]
    held = HeldPolls(30.0, clock=lambda: now[0])
    beats: list[str] = []
    gone: set[str] = set()

    def probe(name: str) -> Any:
        async def disconnected() -> bool:
            return name in gone
        return disconnected

    a1, a2, b1 = probe("a1"), probe("a2"), probe("b1")
    held.enter("a", a1)
    held.enter("a", a2)  # a reconnecting agent's new poll before its old one ended
    held.enter("b", b1)
    assert held.leave("a", a1) and held.holds("a") and len(held) == 2
    assert run_async(held.beat(beats.append)) == 0 and beats == []  # not due yet
    now[0] += 30.0
    assert run_async(held.beat(beats.append)) == 2 and sorted(beats) == ["a", "b"]
    gone.add("b1")  # b's client closed its connection: not present from the next beat on
    now[0] += 30.0
    assert run_async(held.beat(beats.append)) == 1 and beats[-1] == "a" and not held.holds("b")
    assert held.leave("b", b1) is False  # its route learns it was dropped: no heartbeat on the answer
    assert held.leave("a", a2) and len(held) == 0
    assert run_async(held.beat(beats.append, force=True)) == 0
