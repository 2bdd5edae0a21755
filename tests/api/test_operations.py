"""Operations: structured logs with request ids and an access log (a real controller process, each format),
audit events over syslog TCP and TLS (RFC 5424 octet counting), metrics for versions, flows and the
database, and the controller's systemd unit."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.api.conftest import Api, make_settings
from tests.api.test_cli import _free_port

from stockade.controller.app import create_app
from stockade.controller.services.events import SyslogFormat, SyslogTarget, SyslogTransport
from stockade.controller.tls import ensure_tls
from stockade.logs import LogFormat, configure_logging

# ---- logs ------------------------------------------------------------------------------------


class LoggingController:
    """``stockade controller --log-format FMT`` as a real process; stderr (the log) read after it stops."""

    def __init__(self, tmp_path: Path, fmt: str) -> None:
        port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stockade.cli", "controller", "--data-dir", str(tmp_path / "data"),
             "--port", str(port), "--insecure-http", "--log-format", fmt],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(self.base + "/api/v1/openapi.json", timeout=2)
                return
            except httpx.TransportError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "controller did not start"
                time.sleep(0.1)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def _logfmt(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    rest = line
    while rest:
        key, _, rest = rest.partition("=")
        if rest.startswith('"'):
            end = 1
            while rest[end] != '"' or rest[end - 1] == "\\":
                end += 1
            out[key.strip()] = json.loads(rest[: end + 1])
            rest = rest[end + 2:]
        else:
            value, _, rest = rest.partition(" ")
            out[key.strip()] = value
    return out


@pytest.mark.parametrize("fmt", ["json", "logfmt", "text"])
def test_access_log_with_request_ids(tmp_path: Path, fmt: str) -> None:
    live = LoggingController(tmp_path, fmt)
    try:
        given = httpx.get(live.base + "/api/v1/auth/whoami", headers={"X-Request-ID": "trace-abc_1"})
        assert given.status_code == 401 and given.headers["x-request-id"] == "trace-abc_1"
        hostile = httpx.get(live.base + '/api/v1/no"such path', headers={"X-Request-ID": 'x" injected=1'})
        rid = hostile.headers["x-request-id"]
        assert rid != 'x" injected=1' and len(rid) == 16
    finally:
        err = live.stop()
    lines = [ln for ln in err.splitlines() if "stockade.access" in ln]
    assert len(lines) >= 2, err
    if fmt == "json":
        records = [json.loads(ln) for ln in lines]
        first = next(r for r in records if r.get("request_id") == "trace-abc_1")
        assert first["status"] == 401 and first["route"].endswith("/auth/whoami") and first["method"] == "GET"
        second = next(r for r in records if r.get("request_id") == rid)
        assert second["path"] == '/api/v1/no"such path' and second["status"] == 404
    elif fmt == "logfmt":
        records = [_logfmt(ln) for ln in lines]
        first = next(r for r in records if r.get("request_id") == "trace-abc_1")
        assert first["status"] == "401" and first["logger"] == "stockade.access"
        second = next(r for r in records if r.get("request_id") == rid)
        assert second["path"] == '/api/v1/no"such path', "quoted and escaped, so the line stays one record"
    else:
        assert any("request_id=trace-abc_1" in ln and "status=401" in ln for ln in lines), lines


def test_log_lines_escape_control_characters() -> None:
    for fmt in LogFormat:
        buf = io.StringIO()
        configure_logging("info", fmt, buf)
        logging.getLogger("stockade.test").info("evil\nstockade.access: forged", extra={"path": "/a\nb"})
        text = buf.getvalue()
        assert text.count("\n") == 1, (fmt, text)
    configure_logging("warning", LogFormat.TEXT)


# ---- syslog over TCP and TLS ---------------------------------------------------------------------


class _Receiver:
    """A syslog receiver: TCP, optionally TLS; reads RFC 6587 octet-counted frames."""

    def __init__(self, tls: ssl.SSLContext | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.tls = tls
        self.frames: list[str] = []
        self.got = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True)
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b" " in buf:
                length, _, rest = buf.partition(b" ")
                if len(rest) < int(length):
                    break
                self.frames.append(rest[: int(length)].decode())
                buf = rest[int(length):]
                self.got.set()


@pytest.mark.parametrize("transport", [SyslogTransport.TCP, SyslogTransport.TLS])
def test_syslog_over_tcp_and_tls(tmp_path: Path, transport: SyslogTransport) -> None:
    server_ctx = None
    ca_file = None
    if transport is SyslogTransport.TLS:
        files = ensure_tls(tmp_path / "tls", ("127.0.0.1",))
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(str(files.server_cert), str(files.server_key))
        ca_file = str(files.ca_cert)
    rx = _Receiver(server_ctx)
    target = SyslogTarget("127.0.0.1", rx.port, SyslogFormat.JSON, transport, ca_file)
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", syslog=target))
    with TestClient(app) as client:
        api = Api(client, app.state.controller)
        api.ok("POST", "/services", 201, json={"name": "web", "ports": ["80/tcp"]})
        forwarder = app.state.controller.forwarder
        assert forwarder is not None and forwarder.flush(10)
        deadline = time.monotonic() + 10
        while not any("service.create" in f for f in rx.frames) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert any("service.create" in f for f in rx.frames), (rx.frames, forwarder.sent, forwarder.dropped)
    line = next(f for f in rx.frames if "service.create" in f)
    assert line.startswith("<133>1 ") and " stockade - audit - " in line
    event = json.loads(line.split(" audit - ", 1)[1])
    assert event["action"] == "service.create" and event["name"] == "web"


def test_syslog_tls_refuses_an_untrusted_receiver(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls", ("127.0.0.1",))
    other = ensure_tls(tmp_path / "other", ("127.0.0.1",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(files.server_cert), str(files.server_key))
    rx = _Receiver(server_ctx)
    target = SyslogTarget("127.0.0.1", rx.port, SyslogFormat.JSON, SyslogTransport.TLS, str(other.ca_cert))
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}", syslog=target))
    with TestClient(app) as client:
        api = Api(client, app.state.controller)
        api.ok("POST", "/services", 201, json={"name": "web", "ports": ["80/tcp"]})
        rx.got.wait(1.0)
    assert rx.frames == [], "nothing is sent to a receiver whose certificate is not trusted"


# ---- metrics and the unit ------------------------------------------------------------------------


@pytest.fixture
def api_sqlite(tmp_path: Path) -> Iterator[Api]:
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)


def test_metrics_for_versions_flows_and_database(api_sqlite: Api) -> None:
    api = api_sqlite
    api.ok("POST", "/services", 201, json={"name": "web", "ports": ["80/tcp"]})
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    text = api.client.get("/metrics", headers=api.owner).text
    values = {ln.split(" ")[0]: ln.split(" ")[1] for ln in text.splitlines() if ln and not ln.startswith("#")}
    assert values["stockade_db_up"] == "1.0"
    assert values["stockade_policy_active_version"] == "1.0" and values["stockade_policy_versions"] == "1.0"
    assert "stockade_flow_records_ingested_total" in values
    assert float(values["stockade_db_query_seconds"]) > 0


def test_controller_unit() -> None:
    out = subprocess.run([sys.executable, "-m", "stockade.cli", "controller-unit", "--port", "443"],
                         capture_output=True, text=True, check=True).stdout
    assert "ExecStart=" in out and "--port 443" in out and "--log-format json" in out
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in out and "User=stockade" in out
    bad = subprocess.run([sys.executable, "-m", "stockade.cli", "controller-unit", "--database-url",
                          "x'\nExecStartPre=/bin/sh"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "ExecStartPre" not in bad.stdout
