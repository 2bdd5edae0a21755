"""A FAKE Stockade controller, for tests only. It is not the controller and shares no code with it.

It speaks only the agent side of :mod:`stockade.controller.api.agents`, with the same paths
and JSON shapes, over plain HTTP (what ``stockade controller --insecure-http`` offers labs),
for one agent::

    POST /api/v1/agents/enroll            {activation_code, hostname, ...} -> 201 {agent_id, token, workload, revision}
    PUT  /api/v1/agents/{id}/interfaces   -> {revision}
    POST /api/v1/agents/{id}/heartbeat    -> {revision}
    GET  /api/v1/agents/{id}/policy/wait?after=N&timeout=S[&include_policy=true][&applied=A]
                                          -> {revision, changed, policy}
    GET  /api/v1/agents/{id}/policy[?since=N] -> {revision, full, base, set_deltas}
    POST /api/v1/agents/{id}/ack          {revision} -> 204
    POST /api/v1/agents/{id}/events       {events: [{kind, detail, revision, time}]} -> 204
    POST /api/v1/agents/{id}/flows        -> 204 (discarded)

What it serves is whatever :class:`Answer` the test sets with :meth:`FakeController.serve_answer`,
including answers a real controller never gives: a malformed HostPolicy, a policy the agent's
backend cannot express, a revision lower than one served before. It records what the agent
says (events, acknowledged revisions, long-polls) for the test to assert on.

Differences from the real controller, on purpose: it never computes a delta (``full`` is
always sent unless the agent already has the revision), and a waiting long-poll is answered
as soon as the test changes the answer, not only when the revision exceeds ``after`` (so a
revision going backwards reaches the agent without waiting out a whole long-poll).

:meth:`FakeController.start` can listen inside a named network namespace: the listening
socket is created by a thread that entered the namespace (``setns`` is per thread), so lab
hosts reach the fake on a lab address without touching the root namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/api/v1"
CLONE_NEWNET = 0x40000000
_AGENT_PATH = re.compile(r"^/api/v1/agents/([0-9a-f]+)/(interfaces|heartbeat|policy/wait|policy|ack|events|flows)$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class Answer:
    """What the fake serves: a revision and the ``full`` HostPolicy JSON (any JSON value, valid or not)."""

    revision: int
    full: Any


@dataclass(frozen=True)
class ReceivedEvent:
    kind: str
    detail: str
    revision: int | None
    received: float  # time.monotonic() when the fake got it


@dataclass(frozen=True)
class LongPoll:
    after: int
    applied: int | None
    received: float  # time.monotonic() when the request arrived


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def enter_netns_thread(name: str) -> None:
    """Move the calling thread (only it) into the network namespace ``/run/netns/<name>``."""
    if not _NETNS_NAME.match(name):
        raise ValueError(f"invalid network namespace name {name!r}")
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    # TCPServer, not HTTPServer: HTTPServer.server_bind resolves the host name (no DNS in a lab).
    allow_reuse_address = True
    daemon_threads = True
    fake: FakeController

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the agent went away mid-answer (it was stopped): nothing to report
        super().handle_error(request, client_address)


class FakeController:
    """One fake controller for one agent. Thread-safe; every record is a snapshot copy."""

    def __init__(self, activation_code: str) -> None:
        self.activation_code = activation_code
        self.agent_id = secrets.token_hex(8)
        self.token = f"agt_{self.agent_id}_{secrets.token_hex(16)}"
        self.workload: str | None = None
        self._cond = threading.Condition()
        self._answer: Answer | None = None
        self._generation = 0
        self._closing = False
        self._events: list[ReceivedEvent] = []
        self._acks: list[int] = []  # POST .../ack and ``applied=`` on long-polls
        self._heartbeats = 0
        self._polls: list[LongPoll] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- the test's side ------------------------------------------------------------------
    def serve_answer(self, answer: Answer) -> None:
        """From now on answer with ``answer``; wakes every waiting long-poll."""
        with self._cond:
            self._answer = answer
            self._generation += 1
            self._cond.notify_all()

    def events(self) -> list[ReceivedEvent]:
        with self._cond:
            return list(self._events)

    def acked(self) -> list[int]:
        """Every revision the agent acknowledged, in order (duplicates kept)."""
        with self._cond:
            return list(self._acks)

    def polls(self) -> list[LongPoll]:
        with self._cond:
            return list(self._polls)

    def start(self, host: str, port: int, netns: str | None = None) -> None:
        """Listen on ``host:port`` (inside ``netns`` when given) and serve in a daemon thread."""
        ready: Future[_Server] = Future()
        self._thread = threading.Thread(target=self._serve, args=(host, port, netns, ready),
                                        name="fake-controller", daemon=True)
        self._thread.start()
        self._server = ready.result(timeout=10)

    def _serve(self, host: str, port: int, netns: str | None, ready: Future[_Server]) -> None:
        try:
            if netns is not None:
                enter_netns_thread(netns)  # this thread only; the socket stays in that namespace
            server = _Server((host, port), _Handler)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        server.fake = self
        ready.set_result(server)
        server.serve_forever(poll_interval=0.1)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # ---- the agent's side (called by the handler) ---------------------------------------------
    def _authorised(self, agent_id: str, authorization: str | None) -> None:
        if self.workload is None or agent_id != self.agent_id or authorization != f"Bearer {self.token}":
            raise _HttpError(401, "invalid agent credential")

    def _revision(self) -> int:
        return self._answer.revision if self._answer is not None else 0

    def enroll(self, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or body.get("activation_code") != self.activation_code:
            raise _HttpError(403, "unknown or revoked activation code")
        hostname = body.get("hostname")
        if not isinstance(hostname, str) or not hostname:
            raise _HttpError(422, "hostname: required")
        with self._cond:
            if self.workload is not None:
                raise _HttpError(409, f"workload {self.workload!r} already has an enrolled agent")
            self.workload = hostname
            return 201, {"agent_id": self.agent_id, "token": self.token, "workload": hostname,
                         "revision": self._revision()}

    def fetch(self, since: int | None) -> dict[str, Any]:
        with self._cond:
            answer = self._answer
        if answer is None:
            raise _HttpError(404, "no policy compiled for this workload yet")
        if since is not None and since == answer.revision:
            return {"revision": answer.revision, "full": None, "base": answer.revision, "set_deltas": []}
        return {"revision": answer.revision, "full": answer.full, "base": None, "set_deltas": []}

    def wait(self, after: int, timeout: float, include_policy: bool, applied: int | None) -> dict[str, Any]:
        deadline = time.monotonic() + min(max(timeout, 0.0), 60.0)
        with self._cond:
            self._polls.append(LongPoll(after, applied, time.monotonic()))
            if applied is not None:
                self._acks.append(applied)
            generation = self._generation

            def ready() -> bool:
                return self._closing or self._revision() > after or self._generation != generation

            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            rev = self._revision()
        if include_policy and rev > after:
            policy = self.fetch(after or None)
            return {"revision": policy["revision"], "changed": True, "policy": policy}
        return {"revision": rev, "changed": rev > after, "policy": None}

    def ack(self, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("revision"), int):
            raise _HttpError(422, "revision: an integer is required")
        with self._cond:
            self._acks.append(body["revision"])

    def record_events(self, body: Any) -> None:
        items = body.get("events") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise _HttpError(422, "events: a list is required")
        now = time.monotonic()
        received = []
        for ev in items:
            if not isinstance(ev, dict) or not isinstance(ev.get("kind"), str):
                raise _HttpError(422, "events: each needs a kind")
            rev = ev.get("revision")
            received.append(ReceivedEvent(ev["kind"], str(ev.get("detail", "")),
                                          rev if isinstance(rev, int) else None, now))
        with self._cond:
            self._events.extend(received)

    def heartbeat(self) -> dict[str, Any]:
        with self._cond:
            self._heartbeats += 1
            return {"revision": self._revision()}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the agent pools its connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads the records
        return

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise _HttpError(422, f"body is not JSON: {exc}") from exc

    def _send(self, status: int, payload: Any = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            body = self._body()
            if method == "POST" and url.path == f"{API}/agents/enroll":
                status, out = fake.enroll(body)
                self._send(status, out)
                return
            m = _AGENT_PATH.match(url.path)
            if m is None:
                raise _HttpError(404, f"no route {method} {url.path}")
            fake._authorised(m.group(1), self.headers.get("Authorization"))
            self._route(fake, method, m.group(2), query, body)
        except _HttpError as exc:
            self._send(exc.status, {"detail": str(exc)})
        except (KeyError, ValueError) as exc:
            self._send(422, {"detail": f"bad request: {exc}"})

    def _route(self, fake: FakeController, method: str, what: str, query: dict[str, str], body: Any) -> None:
        handlers: dict[tuple[str, str], Callable[[], Any]] = {
            ("PUT", "interfaces"): fake.heartbeat,  # addresses are not tracked; answers {revision}
            ("POST", "heartbeat"): fake.heartbeat,
            ("GET", "policy/wait"): lambda: fake.wait(
                int(query.get("after", "0")), float(query.get("timeout", "30")),
                query.get("include_policy", "false").lower() == "true",
                int(query["applied"]) if "applied" in query else None),
            ("GET", "policy"): lambda: fake.fetch(int(query["since"]) if "since" in query else None),
            ("POST", "ack"): lambda: fake.ack(body),
            ("POST", "events"): lambda: fake.record_events(body),
            ("POST", "flows"): lambda: None,
        }
        handler = handlers.get((method, what))
        if handler is None:
            raise _HttpError(405, f"method {method} not allowed on {what}")
        out = handler()
        if out is None:
            self._send(204)
        else:
            self._send(200, out)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")
