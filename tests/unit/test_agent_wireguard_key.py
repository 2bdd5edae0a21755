"""The agent's WireGuard key over time: registered at enrolment, registration retried until the
controller takes it, and rotated on the schedule (``--wireguard-rotate-hours``), against the
in-memory controller. The datapath itself is proven in tests/kernel/test_wireguard.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stockade.agent import wireguard_key
from stockade.agent.fake import FakeController, FakeControllerClient, wait_until
from stockade.errors import ConflictError
from tests.unit.test_agent_loop import OPTIONS, Harness


def registered(h: Harness) -> str | None:
    try:
        key: str | None = h.controller.agent_for("web1").wireguard_key
    except KeyError:
        return None
    return key


def local_public(h: Harness) -> str:
    return wireguard_key.load_or_create(h.state.path)


def test_the_key_is_rotated_on_schedule_and_each_new_one_registered(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a = h.agent(dataclasses.replace(OPTIONS, wireguard_rotate_interval=0.3, wireguard_retry_seconds=0.05))
    try:
        a.start()
        assert wait_until(lambda: registered(h) is not None, 5)
        first = registered(h)
        assert first == local_public(h)  # only the public half left the host
        assert wait_until(lambda: registered(h) not in (None, first), 5), "no rotation"
        second = registered(h)
        assert second == local_public(h) and second != first
        assert wait_until(lambda: registered(h) not in (None, first, second), 5), "rotation is not periodic"
    finally:
        h.stop()


def test_a_refused_registration_is_retried_not_forgotten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path)
    calls: list[int] = []
    real = FakeControllerClient.register_wireguard_key

    def flaky(self: FakeControllerClient, public_key: str, endpoint: str | None, port: int) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConflictError("the controller is not ready for it")
        real(self, public_key, endpoint, port)

    monkeypatch.setattr(FakeControllerClient, "register_wireguard_key", flaky)
    a = h.agent(dataclasses.replace(OPTIONS, wireguard_retry_seconds=0.05))
    try:
        a.start()
        assert wait_until(lambda: registered(h) is not None, 5), f"gave up after {len(calls)} attempt(s)"
        assert len(calls) == 3 and registered(h) == local_public(h)
    finally:
        h.stop()


def test_no_rotation_unless_asked(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeController())
    a = h.agent(dataclasses.replace(OPTIONS, wireguard_retry_seconds=0.05))
    try:
        a.start()
        assert wait_until(lambda: registered(h) is not None, 5)
        first = registered(h)
        assert not wait_until(lambda: registered(h) != first, 0.5)
    finally:
        h.stop()


def test_wipe_removes_every_state_file_the_agent_names(tmp_path: Path) -> None:
    """``stockade agent uninstall`` leaves no state directory behind, whichever files exist: every
    ``*_FILE`` the state module names (a new one that wipe() forgets fails here)."""
    from stockade.agent import state as state_module
    from stockade.agent.state import StateDir

    names = [v for k, v in vars(state_module).items() if k.endswith("_FILE") and isinstance(v, str)]
    assert len(names) >= 8, names
    sd = StateDir(tmp_path / "state")
    sd.path.mkdir(parents=True, exist_ok=True)
    for n in names:
        (sd.path / n).write_text("x")
    sd.wipe()
    assert not sd.path.exists(), sorted(p.name for p in sd.path.iterdir())
