"""Enforcer.switch_backend: make-before-break, and a failing new backend leaves the old in force."""

from __future__ import annotations

from pathlib import Path

from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import MemoryBackend
from stockade.agent.main import previous_backend
from stockade.agent.state import StateDir
from stockade.errors import ApplyError
from tests.unit.test_agent_core import host_policy


class Recording(MemoryBackend):
    """A memory backend that writes every apply/remove into a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name = name
        self.log = log

    def apply(self, artifact: object) -> None:  # type: ignore[override]
        super().apply(artifact)  # type: ignore[arg-type]
        self.log.append(f"{self.name}:apply")

    def read_back(self) -> str:
        self.log.append(f"{self.name}:read")
        return super().read_back()

    def remove(self) -> None:
        self.log.append(f"{self.name}:remove")
        super().remove()


def test_the_new_backend_is_in_force_before_the_old_is_removed() -> None:
    log: list[str] = []
    old, new = Recording("iptables", log), Recording("nftables", log)
    enforcer = Enforcer(old)
    hp = host_policy()
    enforcer.enforce(hp)
    log.clear()
    enforcer.switch_backend(new)
    assert log.index("nftables:apply") < log.index("nftables:read") < log.index("iptables:remove")
    assert new.installed == hp and old.installed is None
    assert enforcer.backend is new and enforcer.policy == hp
    assert enforcer.check() is None  # the tamper baseline is the new backend's read-back


def test_a_failing_new_backend_leaves_the_old_one_in_force() -> None:
    log: list[str] = []
    old, new = Recording("iptables", log), Recording("ebpf", log)
    enforcer = Enforcer(old)
    enforcer.enforce(host_policy())
    new.lose_applies = True  # apply "works" but nothing is there: the read-back catches it
    try:
        enforcer.switch_backend(new)
        raise AssertionError("switch should fail")
    except ApplyError as exc:
        assert "iptables stays in force" in str(exc)
    assert "iptables:remove" not in log and old.installed is not None
    assert enforcer.backend is old
    assert new.removes == 1  # its partial state is cleaned up


def test_switching_with_nothing_in_force_only_removes_the_old() -> None:
    log: list[str] = []
    old, new = Recording("iptables", log), Recording("nftables", log)
    enforcer = Enforcer(old)
    enforcer.switch_backend(new)
    assert log == ["iptables:remove"] and enforcer.backend is new


def test_a_restart_with_another_backend_switches_from_the_recorded_one(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    assert previous_backend(state, "nftables", None) is None  # first start: nothing to switch from
    state.save_backend("iptables")
    assert previous_backend(state, "nftables", None) == "iptables"
    assert previous_backend(state, "iptables", None) is None  # same backend: no switch
    assert previous_backend(state, "ebpf", "nftables") == "nftables"  # --switch-from wins
    (tmp_path / "state" / "backend").write_text("../../etc\n")
    assert state.load_backend() is None  # a mangled file is ignored, never used as a name
