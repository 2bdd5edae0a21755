"""``stockade agent install``, the shipped unit file, systemd notification, the stashed activation code."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from stockade.agent.agent import Agent, AgentOptions
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import FakeController, FakeControllerClient, MemoryBackend, wait_until
from stockade.agent.host import HostReport
from stockade.agent.state import StateDir
from stockade.agent.systemd import UNIT_NAME, UnitOptions, exec_start, notify, render_unit
from stockade.cli import main
from tests.unit.test_agent_core import host_policy

REPO = Path(__file__).resolve().parents[2]


def test_shipped_unit_is_the_default_rendering() -> None:
    shipped = (REPO / "packaging" / "systemd" / "stockade-agent.service").read_text()
    assert shipped == render_unit(UnitOptions())
    exec_line = "ExecStart=/usr/bin/python3 -m stockade.agent --backend nftables --state-dir /var/lib/stockade-agent"
    assert exec_line in shipped
    assert "Type=notify" in shipped and "Restart=always" in shipped


def test_exec_start_quotes_arguments() -> None:
    line = exec_start(UnitOptions(controller="https://10.0.0.1:8443", hostname="web 1", state_dir=Path("/srv/s a")))
    assert "--controller https://10.0.0.1:8443" in line
    assert "'web 1'" in line and "'/srv/s a'" in line


@pytest.mark.parametrize("source", ["file", "stdin", "env"])
def test_install_writes_unit_and_keeps_the_code_out_of_it(tmp_path: Path, source: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    unit_dir, state_dir = tmp_path / "units", tmp_path / "state"
    given = tmp_path / "code.txt"
    given.write_text("act_SECRETCODE\n")
    code_args = {"file": ["--activation-code-file", str(given)], "stdin": ["--activation-code-file", "-"],
                 "env": []}[source]
    if source == "env":
        monkeypatch.setenv("STOCKADE_ACTIVATION_CODE", "act_SECRETCODE")
    result = CliRunner().invoke(
        main,
        ["agent", "install", "--controller", "https://10.70.0.1:8443", *code_args,
         "--state-dir", str(state_dir), "--unit-dir", str(unit_dir), "--python", "/opt/stockade/bin/python"],
        input="act_SECRETCODE\n" if source == "stdin" else None,
    )
    assert result.exit_code == 0, result.output
    unit = (unit_dir / UNIT_NAME).read_text()
    assert "ExecStart=/opt/stockade/bin/python -m stockade.agent" in unit
    assert "--controller https://10.70.0.1:8443" in unit
    assert "act_SECRETCODE" not in unit
    assert stat.S_IMODE((unit_dir / UNIT_NAME).stat().st_mode) == 0o644
    code_file = state_dir / "activation-code"
    assert code_file.read_text() == "act_SECRETCODE"
    assert stat.S_IMODE(code_file.stat().st_mode) == 0o600
    assert "STOCKADE_ACTIVATION_CODE" not in os.environ  # read once, not inherited by children


def test_the_code_is_never_a_command_line_argument(tmp_path: Path) -> None:
    """Command lines are world-readable (ps): neither the agent nor install takes the code there."""
    for argv in (["agent", "--activation-code", "act_X"], ["agent", "install", "--controller", "https://c",
                                                          "--activation-code", "act_X"]):
        result = CliRunner().invoke(main, [*argv, "--state-dir", str(tmp_path)])
        assert result.exit_code == 2 and "No such option" in result.output
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = CliRunner().invoke(main, ["agent", "install", "--controller", "https://c", "--activation-code-file",
                                       str(empty), "--state-dir", str(tmp_path / "s"), "--unit-dir", str(tmp_path)])
    assert result.exit_code == 1 and "is empty" in result.output


def test_stashed_code_is_used_once_then_deleted(tmp_path: Path) -> None:
    ctl = FakeController()
    ctl.add_code("act_stashed", "web1")
    ctl.publish(host_policy())
    state = StateDir(tmp_path)
    state.save_activation_code("act_stashed")
    be = MemoryBackend()
    a = Agent(
        AgentOptions(controller="fake://c", long_poll_seconds=0.2, watch_addresses=False),
        state,
        Enforcer(be),
        lambda url, ca: FakeControllerClient(ctl, url, ca),
        host_reader=lambda: HostReport("web1", "Linux", ()),
    )
    a.start()
    try:
        assert wait_until(lambda: be.installed == host_policy(), 3.0)
        assert state.load_activation_code() is None and state.load_credential() is not None
    finally:
        a.stop()


def test_notify_speaks_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify() is False
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1") is True
        assert server.recv(64) == b"READY=1"
    os.unlink(path)


def test_default_backend_is_the_registrys_and_others_come_from_it() -> None:
    from stockade.agent.main import DEFAULT_BACKEND, make_backend
    from stockade.backends.registry import BACKENDS

    assert type(make_backend(DEFAULT_BACKEND, "t1")) is BACKENDS[DEFAULT_BACKEND]
    assert make_backend(DEFAULT_BACKEND, "t1").table == "t1"
    other = next(n for n in sorted(BACKENDS) if n != DEFAULT_BACKEND)
    assert type(make_backend(other, None)) is BACKENDS[other]


def test_unknown_backend_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["agent", "--backend", "nosuch", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "unknown backend 'nosuch'" in result.stderr and "nftables" in result.stderr


def test_agent_start_path_does_not_import_every_backend() -> None:
    code = "import sys, stockade.agent.main; print('stockade.backends.registry' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("fmt", ["json", "logfmt"])
def test_agent_logs_in_the_chosen_format(tmp_path: Path, fmt: str) -> None:
    """``--log-format json|logfmt``: every line a record with time, level, logger and message."""
    import json
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "stockade.agent", "--log-format", fmt, "--state-dir",
                             str(tmp_path / "state")], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60  # a loaded machine may take seconds to import the agent
    for ln in proc.stderr:  # until the line this test is about (or the agent exits)
        if ln.strip():
            lines.append(ln.rstrip("\n"))
        if "not enrolled" in ln or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    lines += [ln for ln in (rest or "").splitlines() if ln.strip()]
    err = "\n".join(lines)
    assert any("not enrolled" in ln for ln in lines), err
    for ln in lines:
        if fmt == "json":
            rec = json.loads(ln)
            assert {"time", "level", "logger", "msg"} <= rec.keys()
        else:
            assert ln.startswith("time=") and " level=" in ln and " logger=" in ln and " msg=" in ln, ln
