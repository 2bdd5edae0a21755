"""Signs every request the agent sends with its host key (an ``httpx.Auth``).

:class:`AgentAuth` adds the bearer token and the signature headers of
:mod:`stockade.agent_signature` to each request of the policy client
(:mod:`stockade.agent.http_client`) and of the flow sender (:mod:`stockade.agent.flows`). The
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
from collections.abc import Generator
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade import agent_signature as sig
from stockade.agent.state import NEXT_KEY_FILE, Credential

_instance = secrets.token_hex(16)


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


class AgentAuth(httpx.Auth):
    """Bearer token + (when the agent has a key) a fresh signature on every request."""

    requires_request_body = True

    def __init__(self, credential: Credential, *, instance: str | None = None) -> None:
        self.agent_id = credential.agent_id
        self.token = credential.token
        self.key_file = KeyFile(credential.key_file) if credential.key_file is not None else None
        self.instance = instance  # None: this process's

    def _sign(self, request: httpx.Request) -> None:
        request.headers["Authorization"] = f"Bearer {self.token}"
        if self.key_file is not None:
            request.headers.update(signed_headers(self.agent_id, self.key_file.key(), request, self.instance))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._sign(request)
        response = yield request
        if response.status_code == 401 and self.key_file is not None and self.key_file.promote_next():
            self._sign(request)
            yield request
