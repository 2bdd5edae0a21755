"""Proves every request the agent sends with its host key (an ``httpx.Auth``).

:class:`AgentAuth` adds the bearer token and the signature headers of
:mod:`stockade.agent_signature` to each request of the policy client
(:mod:`stockade.agent.http_client`) and of the flow sender (:mod:`stockade.agent.flows`). The
proof is a session's MAC once a session is open (:class:`AgentAuth`), a signature before. The
key is read from its file and read again when the file changes, so a key rotated by
``stockade agent rotate-key`` is picked up by a running agent without a restart. If the
controller answers 401 while a rotation's next key is waiting (a rotation interrupted after the
controller took the new key), the next key is promoted and the request is signed again once.

The instance id names this process: every client of one agent process signs with the same one,
and ``stockade agent`` writes it to the state dir so CLI commands on the same host reuse it (the
controller reads alternating instances as two hosts sharing one credential).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade import agent_session as sess
from stockade import agent_signature as sig
from stockade.agent.state import NEXT_KEY_FILE, Credential

_instance = secrets.token_hex(16)
SESSION_OPEN_INTERVAL = 30.0  # seconds: never more than one session opened per this, per client
SESSION_RENEW_MARGIN = 120.0  # open the next session this long before the controller's expiry
SIGNED_ONLY = (b"/session", b"/key")  # always signed: opening a session, rotating the key


def process_instance() -> str:
    return _instance


def adopt_instance(instance: str | None) -> None:
    """Sign as the agent process running on this host (CLI commands), if its id is known."""
    global _instance
    if instance and len(instance) == 32 and all(c in "0123456789abcdef" for c in instance):
        _instance = instance


class KeyFile:
    """The private key at ``path``, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._key: Ed25519PrivateKey | None = None

    def key(self) -> Ed25519PrivateKey:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_ino)
        with self._lock:
            if self._key is None or stamp != self._stamp:
                self._key = sig.load_private_key_pem(self.path.read_bytes())
                self._stamp = stamp
            return self._key

    def promote_next(self) -> bool:
        """An interrupted rotation: the controller may hold the next key already."""
        nxt = self.path.with_name(NEXT_KEY_FILE)
        try:
            nxt.replace(self.path)
        except FileNotFoundError:
            return False
        return True


def target_of(request: httpx.Request) -> str:
    return request.url.raw_path.decode("ascii")


def signed_headers(agent_id: str, key: Ed25519PrivateKey, request: httpx.Request,
                   instance: str | None = None, now: float | None = None) -> dict[str, str]:
    fields = sig.SignedFields(agent_id, request.method, target_of(request), int(time.time() if now is None else now),
                              sig.new_nonce(), instance or process_instance())
    return sig.sign_request(key, fields, request.content)


@dataclass(frozen=True)
class _Session:
    id: str
    key: bytes = field(repr=False)  # K: in this process's memory only, never printed
    instance: str  # the process instance that opened it (the controller binds it)
    renew_at: float  # monotonic: open a new one from then on (before the controller's expiry)


_OPEN = "stockade_session_open"  # marks the request that opens a session (its answer is read)


def _agent_base(request: httpx.Request, agent_id: str) -> bytes | None:
    """``/api/v1/agents/<id>`` as this request's path starts, or None (not an agent route)."""
    path = request.url.raw_path.split(b"?", 1)[0]
    marker = f"/agents/{agent_id}/".encode()
    at = path.find(marker)
    return None if at < 0 else path[:at + len(marker) - 1]


class AgentAuth(httpx.Auth):
    """Bearer token + (when the agent has a key) a proof on every request: the MAC of a session
    bound to the key (:mod:`stockade.agent_session`) when one is open, else a signature.

    The first request is signed; once one was accepted, a session is opened (Ed25519-signed) before
    the next request, at most once per :data:`SESSION_OPEN_INTERVAL`, and renewed before it
    expires (so a one-shot client, a CLI command, never opens one). A request refused (401) on a
    session - the replica restarted or is another one, the key was rotated - drops the session and
    is sent again signed, so its caller sees what a signed request gets."""

    def __init__(self, credential: Credential, *, instance: str | None = None, sessions: bool = True) -> None:
        self.agent_id = credential.agent_id
        self.token = credential.token
        self.key_file = KeyFile(credential.key_file) if credential.key_file is not None else None
        self.instance = instance  # None: this process's
        self.use_sessions = sessions
        self.sessions_opened = 0
        self._session: _Session | None = None
        self._next_open = 0.0  # monotonic
        self._proven = False  # a signed request of this client was accepted (a one-shot client never opens)
        self._lock = threading.Lock()

    def _clear(self, request: httpx.Request) -> None:
        for name in (sig.SIGNATURE_HEADER, sess.SESSION_HEADER, sess.MAC_HEADER):
            request.headers.pop(name, None)

    def _sign(self, request: httpx.Request) -> None:
        request.headers["Authorization"] = f"Bearer {self.token}"
        self._clear(request)
        if self.key_file is not None:
            request.headers.update(signed_headers(self.agent_id, self.key_file.key(), request, self.instance))

    def _mac(self, request: httpx.Request, session: _Session) -> None:
        self._clear(request)
        fields = sig.SignedFields(self.agent_id, request.method, target_of(request), int(time.time()),
                                  sig.new_nonce(), session.instance)
        request.headers.update(sess.mac_request(session.key, session.id, fields, request.content))

    def _usable(self) -> _Session | None:
        with self._lock:
            s, instance = self._session, self.instance or process_instance()
            if s is not None and (time.monotonic() >= s.renew_at or s.instance != instance):
                self._session = s = None
            return s

    def _claim_open(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next_open:
                return False
            self._next_open = now + SESSION_OPEN_INTERVAL
            return True

    def drop_session(self, session: _Session | None = None) -> None:
        with self._lock:
            if session is None or self._session is session:
                self._session = None

    def _open(self, request: httpx.Request, base: bytes) -> Generator[httpx.Request, httpx.Response, _Session | None]:
        """Open a session (a signed request of its own); None if the controller would not."""
        own = sess.new_exchange_key()
        own_text = sess.exchange_public_text(own)
        opening = httpx.Request("POST", request.url.copy_with(raw_path=base + b"/session"),
                                json={"public_key": own_text}, extensions={_OPEN: True})
        self._sign(opening)
        instance = opening.headers[sig.INSTANCE_HEADER]
        response = yield opening
        if response.status_code in (404, 405):  # a controller from before sessions
            with self._lock:
                self._next_open = time.monotonic() + 10 * SESSION_OPEN_INTERVAL
        if response.status_code != 200:
            return None
        try:
            got = response.json()
            assert self.key_file is not None
            key = sess.derive_session_key(own, str(got["public_key"]), session_id=str(got["session"]),
                                          agent_id=self.agent_id, agent_key_text=sig.public_key_text(
                                              self.key_file.key()), agent_exchange_text=own_text,
                                          controller_exchange_text=str(got["public_key"]))
            session_id, lifetime = str(got["session"]), float(got["expires_in"])
        except (ValueError, KeyError, TypeError, sig.SignatureError):
            return None
        if not sess.is_session_id(session_id):
            return None
        opened = _Session(session_id, key, instance, time.monotonic() + max(0.0, lifetime - SESSION_RENEW_MARGIN))
        with self._lock:
            self._session = opened
            self.sessions_opened += 1
        return opened

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        session: _Session | None = None
        if self.key_file is not None and self.use_sessions:
            base = _agent_base(request, self.agent_id)
            if base is not None and not request.url.raw_path.split(b"?", 1)[0].endswith(SIGNED_ONLY):
                session = self._usable()
                if session is None and self._proven and self._claim_open():
                    session = yield from self._open(request, base)
        if session is not None:
            request.headers["Authorization"] = f"Bearer {self.token}"
            self._mac(request, session)
            response = yield request
            if response.status_code != 401:
                return
            self.drop_session(session)  # not held by this replica (or refused): the signature decides
        self._sign(request)
        response = yield request
        if response.status_code != 401:
            self._proven = True  # the controller knows this key: sessions from the next request on
        elif self.key_file is not None and self.key_file.promote_next():
            self._sign(request)
            yield request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if request.extensions.get(_OPEN):
                response.read()  # (only the session's answer: every other one stays as the caller asked)
            try:
                request = flow.send(response)
            except StopIteration:
                break

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        flow = self.auth_flow(request)
        request = next(flow)
        while True:
            response = yield request
            if request.extensions.get(_OPEN):
                await response.aread()
            try:
                request = flow.send(response)
            except StopIteration:
                break
