"""The real ``ControllerClient``: JSON over HTTPS (httpx), the controller's CA pinned.

Speaks the agent protocol of :mod:`stockade.controller.api.agents` under ``/api/v1``::

    POST /agents/enroll                      {activation_code, hostname, interfaces, agent_version, public_key}
    PUT  /agents/{id}/interfaces             {interfaces: [{name, addresses}]}
    POST /agents/{id}/heartbeat              {applied_revision, mode, tamper_count}
    GET  /agents/{id}/policy/wait?after=N&timeout=S&include_policy=true[&applied=A]
                                             -> {revision, changed[, policy]}
    GET  /agents/{id}/policy[?since=N]       -> {revision, full | null, base, set_deltas}
    POST /agents/{id}/ack                    {revision}
    POST /agents/{id}/events                 {events: [{kind, detail, revision, time}]}
    POST /agents/{id}/key                    {public_key, proof}   (key rotation)
    POST /agents/{id}/unenroll               {}

Every call after enrolment carries the bearer token and the signature of the agent's host key
(:class:`stockade.agent.signing.AgentAuth`).

Pinning: with a CA PEM, the TLS context trusts that CA and nothing else (not the system
store), so a controller certificate from any other authority is refused. ``http://`` URLs
(``stockade controller --insecure-http``, labs only) use no TLS at all.

Several controllers: ``base_url`` may name several replicas (a list, or one string with the URLs
separated by commas), or one name behind a load balancer. A request that finds its replica
unreachable (connection refused or reset, timeout, 429/5xx) is sent to the next one at once; the
client stays with whichever answered. Replicas share one database, so the agent's credential,
acknowledged revision and the delta from it are the same on every replica.

HTTP status codes map to the agent's exceptions here and nowhere else: 401/403 ->
AuthError, 404 -> NotFoundError, 409 -> ConflictError, 400/422 -> ValidationError,
429/5xx/network errors -> ControllerUnreachableError (retry with backoff).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import httpcore
import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade import __version__
from stockade import agent_signature as sig
from stockade.agent.host import HostReport
from stockade.agent.signing import AgentAuth
from stockade.agent.state import Credential
from stockade.agent.transport import (
    AgentEvent,
    ControllerUnreachableError,
    Enrollment,
    Heartbeat,
    LongPollAnswer,
    PolicyUpdate,
    policy_update_from_dict,
)
from stockade.errors import AuthError, ConflictError, Issue, NotFoundError, StockadeError, ValidationError

log = logging.getLogger("stockade.agent")
API_PREFIX = "/api/v1"
CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 10.0
LONG_POLL_MARGIN = 5.0

# TCP keepalive every second on idle connections (a waiting long-poll). Besides noticing a
# dead controller, the probe re-creates the connection's conntrack entry *from the agent's
# side* after the entry was lost (the firewall table was just installed, so conntrack only
# now starts in this namespace, or someone flushed conntrack): the controller's answer is
# then a reply (ct state established) instead of a "new" inbound packet the policy drops.
KEEPALIVE: list[tuple[int, int, int]] = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),  # a dead path is noticed in ~4 s, not at the read timeout
]


class _TrackedStream(httpcore.NetworkStream):
    """A connection's stream that its ``_Streams`` registry can shut down from another thread.

    Closing a socket does not wake a thread blocked reading it; ``shutdown`` does. After the
    host's addresses change, a request in flight on a connection bound to a removed address
    would otherwise wait for its read timeout."""

    def __init__(self, inner: httpcore.NetworkStream, streams: _Streams) -> None:
        self._inner = inner
        self._streams = streams
        streams.add(self)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._streams.discard(self)
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        self._streams.discard(self)  # the TLS stream takes over the socket
        return _TrackedStream(self._inner.start_tls(ssl_context, server_hostname, timeout), self._streams)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def shut_down(self) -> None:
        sock = self._inner.get_extra_info("socket")
        if sock is not None:
            # the base class's shutdown even on a TLS socket: the fd, not the TLS object another
            # thread is reading through (that read then fails with an OSError httpx maps)
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Streams(httpcore.SyncBackend):
    """The network backend of the agent's connection pools: records every open stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[_TrackedStream] = set()

    def add(self, stream: _TrackedStream) -> None:
        with self._lock:
            self._open.add(stream)

    def discard(self, stream: _TrackedStream) -> None:
        with self._lock:
            self._open.discard(stream)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _TrackedStream(super().connect_tcp(host, port, timeout, local_address, socket_options), self)

    def snapshot(self) -> list[_TrackedStream]:
        with self._lock:
            return list(self._open)


class _Transport(httpx.HTTPTransport):
    """httpx's transport over a connection pool whose streams ``_Streams`` records."""

    def __init__(self, verify: ssl.SSLContext | bool, streams: _Streams) -> None:
        super().__init__(verify=verify, socket_options=KEEPALIVE)
        limits = httpx.Limits()
        self._pool = httpcore.ConnectionPool(  # replaces the pool httpx made: same settings, our backend
            ssl_context=verify if isinstance(verify, ssl.SSLContext) else ssl.create_default_context(),
            max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, socket_options=KEEPALIVE, network_backend=streams,
        )


def controller_urls(text: str | Sequence[str]) -> list[str]:
    """The controller URLs in ``text`` (comma-separated) or a list, without trailing slashes."""
    items = text.split(",") if isinstance(text, str) else list(text)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls:
        raise ValidationError([Issue("agent", 0, "controller", "no controller URL given")])
    return urls


def pinned_context(ca_pem: str) -> ssl.SSLContext:
    """A client TLS context trusting exactly ``ca_pem`` (hostname checked against the cert)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300] or resp.reason_phrase
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])[:300]
    return str(body)[:300]


def raise_for(resp: httpx.Response) -> None:
    code = resp.status_code
    if code < 400:
        return
    msg = f"{resp.request.method} {resp.request.url.path}: {code} {_message(resp)}"
    if code in (401, 403):
        raise AuthError(msg)
    if code == 404:
        raise NotFoundError(msg)
    if code == 409:
        raise ConflictError(msg)
    if code in (400, 422):
        raise ValidationError([Issue("controller", 0, "", msg)])
    if code == 429 or code >= 500:
        raise ControllerUnreachableError(msg)
    raise StockadeError(msg)


class HttpControllerClient:
    """``ControllerClient`` over httpx. Thread-safe (one connection pool)."""

    def __init__(
        self, base_url: str | Sequence[str], ca_pem: str | None = None, *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.urls = controller_urls(base_url)
        self._current = 0  # the replica that answered last
        self._transport = transport
        self._ca_pem = ca_pem
        self._credential: Credential | None = None
        self._auth: AgentAuth | None = None
        self._streams = _Streams()
        self._clients = [self._build(ca_pem, u) for u in self.urls]
        self._missing: set[str] = set()  # endpoints the controller does not have (logged once)
        self._generation = 0  # bumped by ``reconnect``: a request cut by it is sent again at once

    @property
    def base_url(self) -> str:
        """The controller URL in use (the replica that answered last)."""
        return self.urls[self._current]

    @property
    def _client(self) -> httpx.Client:
        return self._clients[self._current]

    def _rebuild(self) -> None:
        old, self._clients = self._clients, [self._build(self._ca_pem, u) for u in self.urls]
        for c in old:
            c.close()

    def _build(self, ca_pem: str | None, url: str) -> httpx.Client:
        verify: ssl.SSLContext | bool = pinned_context(ca_pem) if ca_pem else True
        if url.startswith("https://") and not ca_pem:
            log.warning("no controller CA given: trusting the system store for %s", url)
        transport = self._transport or _Transport(verify, self._streams)
        return httpx.Client(
            base_url=url + API_PREFIX,
            verify=verify,
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            transport=transport,
            headers={"User-Agent": f"stockade-agent/{__version__}"},
        )

    # ---- plumbing ------------------------------------------------------------------------
    def _agent_path(self, suffix: str) -> str:
        if self._credential is None:
            raise AuthError("not enrolled")
        return f"/agents/{self._credential.agent_id}/{suffix}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"params": params}
        if self._auth is not None:
            kwargs["auth"] = self._auth
        if json is not None:
            kwargs["json"] = json
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)
        last: ControllerUnreachableError | None = None
        attempts = len(self.urls)  # each replica once, starting with the one in use
        while attempts > 0:
            attempts -= 1
            generation = self._generation
            try:
                resp = self._client.request(method, path, **kwargs)
                raise_for(resp)
                return resp
            except httpx.HTTPError as exc:
                last = ControllerUnreachableError(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}")
                if generation != self._generation:  # cut by ``reconnect``: the same replica, new connection
                    attempts += 1
                    continue
            except RuntimeError as exc:  # the client was closed under us (shutdown)
                raise ControllerUnreachableError(f"{method} {path}: {exc}") from exc
            except ControllerUnreachableError as exc:  # 429 / 5xx
                last = exc
            if len(self.urls) > 1:
                log.warning("%s; trying the next controller", last)
                self._current = (self._current + 1) % len(self.urls)
        assert last is not None
        raise last

    def _json(self, resp: httpx.Response) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise ValidationError([Issue("controller", 0, "", f"answer is not JSON: {exc}")]) from exc

    def _optional(self, name: str, method: str, path: str, body: Any) -> None:
        """Endpoints older controllers lack: a 404/405 is logged once, not retried forever."""
        if name in self._missing:
            return
        try:
            self._request(method, path, json=body)
        except NotFoundError as exc:
            self._missing.add(name)
            log.warning("controller has no %s endpoint (%s); not sending %s", name, exc, name)
        except StockadeError as exc:
            if "405" in str(exc):
                self._missing.add(name)
                log.warning("controller has no %s endpoint (%s)", name, exc)
                return
            raise

    # ---- ControllerClient ------------------------------------------------------------------
    def enroll(self, activation_code: str, host: HostReport, public_key: str | None = None) -> Enrollment:
        body = {
            "activation_code": activation_code,
            "hostname": host.hostname,
            "interfaces": host.to_dict()["interfaces"],
            "agent_version": __version__,
        }
        if public_key is not None:
            body["public_key"] = public_key
        data = self._json(self._request("POST", "/agents/enroll", json=body))
        try:
            return Enrollment(str(data["agent_id"]), str(data["token"]), str(data["workload"]), data.get("ca_pem"))
        except (KeyError, TypeError) as exc:
            raise ValidationError([Issue("controller", 0, "enroll", f"unexpected answer: {exc!r}")]) from exc

    def use_credential(self, credential: Credential, ca_pem: str | None) -> None:
        self._credential = credential
        self._auth = AgentAuth(credential)
        if ca_pem != self._ca_pem:
            self._ca_pem = ca_pem
            self._rebuild()

    def report_host(self, host: HostReport) -> None:
        self._request("PUT", self._agent_path("interfaces"), json={"interfaces": host.to_dict()["interfaces"]})

    def heartbeat(self, beat: Heartbeat) -> None:
        body = {"applied_revision": beat.applied_revision, "mode": beat.mode, "tamper_count": beat.tamper_count,
                "backend": beat.backend, "backends": list(beat.backends)}
        self._request("POST", self._agent_path("heartbeat"), json=body)

    def wait_revision(self, after: int, timeout: float, applied: int | None = None) -> LongPollAnswer:
        params: dict[str, Any] = {"after": after, "timeout": timeout, "include_policy": "true"}
        if applied is not None:
            params["applied"] = applied
        resp = self._request("GET", self._agent_path("policy/wait"), params=params, timeout=timeout + LONG_POLL_MARGIN)
        data = self._json(resp)
        try:
            revision = int(data["revision"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError([Issue("controller", 0, "revision", f"unexpected answer: {exc!r}")]) from exc
        inline = isinstance(data, dict) and "policy" in data
        update = None
        if inline and data["policy"] is not None:
            try:
                update = policy_update_from_dict(data["policy"])
            except ValidationError:
                update = None  # fetched again explicitly, where a malformed answer is refused with an event
        hold = data.get("hold") if isinstance(data, dict) else None
        # a number of seconds, else ignored (the agent keeps its own): never a reason to refuse an answer
        advertised = float(hold) if isinstance(hold, (int, float)) and not isinstance(hold, bool) and hold > 0 else None
        return LongPollAnswer(revision, update, inline, isinstance(data, dict) and data.get("heartbeat") is True,
                              advertised)

    def fetch_policy(self, since: int | None) -> PolicyUpdate:
        params = {"since": since} if since is not None else None
        return policy_update_from_dict(self._json(self._request("GET", self._agent_path("policy"), params=params)))

    def ack(self, revision: int) -> None:
        self._request("POST", self._agent_path("ack"), json={"revision": revision})

    def send_events(self, events: Sequence[AgentEvent]) -> None:
        self._optional("events", "POST", self._agent_path("events"), {"events": [e.to_dict() for e in events]})

    def unenroll(self) -> None:
        self._request("POST", self._agent_path("unenroll"), json={})

    def rotate_key(self, new_key: Ed25519PrivateKey) -> None:
        if self._credential is None:
            raise AuthError("not enrolled")
        public = sig.public_key_text(new_key)
        proof = sig.b64encode(new_key.sign(sig.rotation_message(self._credential.agent_id, public)))
        self._request("POST", self._agent_path("key"), json={"public_key": public, "proof": proof})

    def register_wireguard_key(self, public_key: str, endpoint: str | None, port: int) -> None:
        self._request("PUT", self._agent_path("wireguard-key"),
                      json={"public_key": public_key, "endpoint": endpoint, "port": port})

    def reconnect(self) -> None:
        """Drop every pooled connection: the host's addresses changed, and a connection bound
        to a removed address would hang. Requests in flight are cut at once (their sockets shut
        down) and sent again on new connections."""
        old = self._streams.snapshot()
        self._generation += 1
        old_clients, self._clients = self._clients, [self._build(self._ca_pem, u) for u in self.urls]
        for stream in old:  # before closing: a closed socket's fd no longer reaches the blocked reader
            stream.shut_down()
        for c in old_clients:
            c.close()
        if old:
            log.info("addresses changed: %d open controller connection(s) cut", len(old))

    def close(self) -> None:
        for c in self._clients:
            c.close()
