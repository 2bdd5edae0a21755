"""The httpx ControllerClient: status mapping, requests on the wire, CA pinning over real TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stockade.agent.host import HostReport, InterfaceReport
from stockade.agent.http_client import HttpControllerClient
from stockade.agent.state import Credential
from stockade.agent.transport import (
    FIRST_POLL_SECONDS,
    AgentEvent,
    ControllerUnreachableError,
    EventKind,
    Heartbeat,
    UpdateKind,
    poll_timeout,
)
from stockade.compiler import host_policy_to_dict
from stockade.errors import AuthError, ConflictError, NotFoundError, ValidationError
from tests.unit.test_agent_core import host_policy

HOST = HostReport("web1", "Linux", (InterfaceReport("eth0", (ipaddress.ip_address("10.0.0.1"),)),))
CRED = Credential("http://ctl", "a1b2", "agt_a1b2_secret", "web1")


class Recorder:
    def __init__(self, answers: dict[tuple[str, str], httpx.Response]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.answers.get((request.method, request.url.path), httpx.Response(404, json={"message": "nope"}))


def client_with(answers: dict[tuple[str, str], httpx.Response]) -> tuple[HttpControllerClient, Recorder]:
    rec = Recorder(answers)
    c = HttpControllerClient("http://ctl", transport=httpx.MockTransport(rec))
    return c, rec


def test_enroll_then_bearer_on_every_call() -> None:
    c, rec = client_with(
        {
            ("POST", "/api/v1/agents/enroll"): httpx.Response(
                201, json={"agent_id": "a1b2", "token": "agt_a1b2_secret", "workload": "web1", "revision": 0}
            ),
            ("GET", "/api/v1/agents/a1b2/policy/wait"): httpx.Response(200, json={"revision": 4, "changed": True}),
            ("GET", "/api/v1/agents/a1b2/policy"): httpx.Response(
                200, json={"revision": 4, "full": host_policy_to_dict(host_policy()), "base": None, "set_deltas": []}
            ),
            ("POST", "/api/v1/agents/a1b2/ack"): httpx.Response(204),
            ("PUT", "/api/v1/agents/a1b2/interfaces"): httpx.Response(200, json={"revision": 5}),
            ("POST", "/api/v1/agents/a1b2/heartbeat"): httpx.Response(200, json={"revision": 5}),
        }
    )
    e = c.enroll("act_code", HOST)
    assert (e.agent_id, e.token, e.workload) == ("a1b2", "agt_a1b2_secret", "web1")
    assert json.loads(rec.requests[0].content) == {
        "activation_code": "act_code",
        "hostname": "web1",
        "interfaces": [{"name": "eth0", "addresses": ["10.0.0.1"]}],
        "agent_version": json.loads(rec.requests[0].content)["agent_version"],
    }
    assert "authorization" not in rec.requests[0].headers
    c.use_credential(CRED, None)
    answer = c.wait_revision(3, 7.5, applied=3)
    assert answer.revision == 4 and answer.update is None and not answer.inline  # an older controller
    wait_req = rec.requests[-1]
    assert wait_req.url.params["after"] == "3" and float(wait_req.url.params["timeout"]) == 7.5
    assert wait_req.url.params["applied"] == "3" and wait_req.url.params["include_policy"] == "true"
    upd = c.fetch_policy(None)
    assert upd.kind is UpdateKind.FULL and upd.policy == host_policy() and upd.revision == 4
    assert "since" not in rec.requests[-1].url.params
    c.ack(4)
    assert json.loads(rec.requests[-1].content) == {"revision": 4}
    c.report_host(HOST)
    c.heartbeat(Heartbeat(4, "full", 0))
    for r in rec.requests[1:]:
        assert r.headers["authorization"] == "Bearer agt_a1b2_secret"


def test_long_poll_with_the_policy_inline() -> None:
    hp = host_policy()
    inline = {"revision": 5, "changed": True,
              "policy": {"revision": 5, "full": host_policy_to_dict(hp), "base": None, "set_deltas": []}}
    c, rec = client_with({("GET", "/api/v1/agents/a1b2/policy/wait"): httpx.Response(200, json=inline)})
    c.use_credential(CRED, None)
    answer = c.wait_revision(4, 1.0)
    assert answer.inline and answer.revision == 5
    assert answer.update is not None and answer.update.kind is UpdateKind.FULL and answer.update.policy == hp
    assert "applied" not in rec.requests[-1].url.params
    bad = {"revision": 6, "changed": True, "policy": {"revision": 6, "full": {"workload": "x"}}}
    c2, _ = client_with({("GET", "/api/v1/agents/a1b2/policy/wait"): httpx.Response(200, json=bad)})
    c2.use_credential(CRED, None)
    answer = c2.wait_revision(5, 1.0)
    assert answer.inline and answer.update is None  # left to the explicit fetch, which refuses it


def test_long_poll_answer_says_whether_it_counted_as_a_heartbeat() -> None:
    path = ("GET", "/api/v1/agents/a1b2/policy/wait")
    for body, counted in (({"revision": 3, "changed": False, "policy": None, "heartbeat": True}, True),
                          ({"revision": 3, "changed": False, "policy": None}, False),  # an older controller
                          ({"revision": 3, "changed": False, "policy": None, "heartbeat": "yes"}, False)):
        c, _ = client_with({path: httpx.Response(200, json=body)})
        c.use_credential(CRED, None)
        assert c.wait_revision(3, 1.0).heartbeat is counted


def test_long_poll_answer_carries_the_advertised_hold_and_the_agent_follows_it() -> None:
    path = ("GET", "/api/v1/agents/a1b2/policy/wait")
    for hold, read in ((120.0, 120.0), (90, 90.0), (None, None), ("120", None), (-5, None), (True, None), (0, None)):
        body = {"revision": 3, "changed": False, "policy": None, "heartbeat": True, "hold": hold}
        c, _ = client_with({path: httpx.Response(200, json=body)})
        c.use_credential(CRED, None)
        assert c.wait_revision(3, 1.0).hold == read
    # the next poll's timeout: 20 s until the controller advertises a hold (or the operator's own),
    # then the hold capped by the operator's, shortened by up to a quarter at random
    assert poll_timeout(None, None, 0.5) == FIRST_POLL_SECONDS == 20.0
    assert poll_timeout(30.0, None, 0.5) == 30.0
    assert poll_timeout(None, 120.0, 0.0) == 120.0
    assert poll_timeout(None, 120.0, 0.999) == pytest.approx(90.03)
    assert poll_timeout(60.0, 120.0, 0.0) == 60.0  # the agent's cap wins
    assert poll_timeout(300.0, 120.0, 0.5) == 105.0


def test_delta_answer_with_since() -> None:
    c, rec = client_with(
        {
            ("GET", "/api/v1/agents/a1b2/policy"): httpx.Response(
                200,
                json={"revision": 6, "full": None, "base": 5,
                      "set_deltas": [{"name": "peer1", "family": 4, "added": ["10.1.0.0/24"], "removed": []}]},
            )
        }
    )
    c.use_credential(CRED, None)
    upd = c.fetch_policy(5)
    assert rec.requests[-1].url.params["since"] == "5"
    assert upd.kind is UpdateKind.DELTA and upd.base == 5
    assert upd.set_deltas[0].added == (ipaddress.ip_network("10.1.0.0/24"),)


@pytest.mark.parametrize(
    ("status", "exc"),
    [(401, AuthError), (403, AuthError), (404, NotFoundError), (409, ConflictError), (422, ValidationError),
     (429, ControllerUnreachableError), (500, ControllerUnreachableError), (503, ControllerUnreachableError)],
)
def test_status_codes_map_to_the_exception_tree(status: int, exc: type[Exception]) -> None:
    c, _ = client_with({("POST", "/api/v1/agents/a1b2/ack"): httpx.Response(status, json={"message": "m"})})
    c.use_credential(CRED, None)
    with pytest.raises(exc):
        c.ack(1)


def test_malformed_policy_answer_is_validation_error() -> None:
    c, _ = client_with({("GET", "/api/v1/agents/a1b2/policy"): httpx.Response(200, content=b"<html>")})
    c.use_credential(CRED, None)
    with pytest.raises(ValidationError):
        c.fetch_policy(None)


def test_missing_events_endpoint_is_tolerated_once() -> None:
    c, rec = client_with({})
    c.use_credential(CRED, None)
    ev = AgentEvent(EventKind.TAMPER, "table missing", 3, 1.0)
    c.send_events([ev])
    c.send_events([ev])
    assert len(rec.requests) == 1  # the second batch is not retried against a missing endpoint


def test_network_error_is_unreachable() -> None:
    c = HttpControllerClient("http://127.0.0.1:9")  # discard port: nothing listens
    c.use_credential(CRED, None)
    with pytest.raises(ControllerUnreachableError):
        c.wait_revision(0, 0.1)
    c.close()


# ---- real TLS: the CA is pinned -----------------------------------------------------------------


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "controller")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"revision": 9, "changed": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    ca_key, ca = _ca("stockade test CA")
    cert_pem, key_pem = _server_cert(ca_key, ca)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", ca.public_bytes(serialization.Encoding.PEM).decode()
    server.shutdown()
    server.server_close()


def test_pinned_ca_accepts_its_controller(tls_server: tuple[str, str]) -> None:
    url, ca_pem = tls_server
    c = HttpControllerClient(url, ca_pem)
    c.use_credential(CRED, ca_pem)
    assert c.wait_revision(0, 1.0).revision == 9
    c.close()


def test_other_ca_is_refused_even_if_valid(tls_server: tuple[str, str]) -> None:
    url, _ = tls_server
    _, other = _ca("some other CA")
    other_pem = other.public_bytes(serialization.Encoding.PEM).decode()
    c = HttpControllerClient(url, other_pem)
    c.use_credential(CRED, other_pem)
    with pytest.raises(ControllerUnreachableError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        c.wait_revision(0, 1.0)
    c.close()


class _FirstRequestHangs(_Handler):
    """Holds the first request (a long-poll on a connection whose address went away); answers the rest."""

    arrived = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:
        if not type(self).arrived.is_set():
            type(self).arrived.set()
            type(self).release.wait(30)
            return
        super().do_GET()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_reconnect_cuts_a_request_in_flight_and_sends_it_again(tmp_path: Path, tls: bool) -> None:
    """After an address change, a request waiting on an old connection is cut at once and sent again
    on a new one, instead of waiting for its read timeout (the long-poll's: 25 s here)."""
    from http.server import ThreadingHTTPServer

    class Handler(_FirstRequestHangs):
        arrived = threading.Event()
        release = threading.Event()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ca_pem: str | None = None
    if tls:
        ca_key, ca = _ca("stockade test CA")
        cert_pem, key_pem = _server_cert(ca_key, ca)
        (tmp_path / "cert.pem").write_bytes(cert_pem)
        (tmp_path / "key.pem").write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    c = HttpControllerClient(url, ca_pem)
    c.use_credential(CRED, ca_pem)
    result: dict[str, Any] = {}

    def poll() -> None:
        try:
            result["revision"] = c.wait_revision(0, 20.0).revision
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    import time
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        assert Handler.arrived.wait(10), "the long-poll never reached the server"
        started = time.monotonic()
        c.reconnect()
        t.join(10)
        elapsed = time.monotonic() - started
        assert not t.is_alive(), "the request in flight was not cut by reconnect()"
        assert result == {"revision": 9}, result
        assert elapsed < 5.0, f"took {elapsed:.1f} s (the old connection was left to time out)"
    finally:
        Handler.release.set()
        c.close()
        server.shutdown()
        server.server_close()
