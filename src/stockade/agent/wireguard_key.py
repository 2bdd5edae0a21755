"""The agent's WireGuard key: an X25519 key pair made on the host, the private half never leaves it.

The private key is written once (mode 0600, created exclusively, then renamed into place, so a
crash never leaves a half-written or world-readable key) in the agent's state directory, in the
base64 form ``wg`` uses. Only the public half is sent to the controller (at enrolment and after
every rotation). The backend's WireGuard device reads the file and writes the key to the
wireguard-go control socket; a rotated file is picked up by its read-back (the device's key no
longer matches: restored like any tamper).

The interface name is derived from the state directory, so two agents on one machine (one per
network namespace in the labs) never share a wireguard-go control socket.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stockade.agent.state import WIREGUARD_KEY_FILE
from stockade.errors import StockadeError

if TYPE_CHECKING:
    from stockade.agent.transport import ControllerClient

log = logging.getLogger("stockade.agent")


def _public_of(private_b64: str) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64, validate=True))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def _new_private() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw).decode()


def _write_private(path: Path, private_b64: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private_b64 + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def key_path(state_dir: Path) -> Path:
    return state_dir / WIREGUARD_KEY_FILE


def load_or_create(state_dir: Path) -> str:
    """The public key of this host's WireGuard key, making the key pair (0600) on first use."""
    path = key_path(state_dir)
    if not path.exists():
        _write_private(path, _new_private())
    return _public_of(path.read_text().strip())


def rotate(state_dir: Path) -> str:
    """A new key pair in place of the old one; returns the new public key to register."""
    _write_private(key_path(state_dir), _new_private())
    return _public_of(key_path(state_dir).read_text().strip())


def interface_name(state_dir: Path) -> str:
    """``stk`` + 10 hex of the state directory's path: unique per agent on a machine, <= 15 chars."""
    return "stk" + hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]


class KeyRegistration:
    """Registers this host's WireGuard public key with the controller, retries a registration that
    failed and rotates the key on a schedule. Until a key is registered, encrypted rules with this
    host drop their traffic (never in the clear)."""

    def __init__(self, state_dir: Path, stop: threading.Event, current_client: Callable[[], ControllerClient | None],
                 *, retry_seconds: float, rotate_every: float, port: int) -> None:
        self.state_dir = state_dir
        self.stop = stop
        self.current_client = current_client
        self.retry_seconds = retry_seconds
        self.rotate_every = rotate_every
        self.port = port
        self.registered = True  # until an attempt fails (enrolment makes the first)

    def register(self, client: ControllerClient, *, new_key: bool = False) -> bool:
        """Make (first time, or a new one with ``new_key``) and register the key. True when registered."""
        try:
            public = rotate(self.state_dir) if new_key else load_or_create(self.state_dir)
            client.register_wireguard_key(public, None, self.port)
        except (StockadeError, OSError, ValueError) as exc:
            log.warning("could not register this host's WireGuard key (%s); retrying in %.0fs", exc,
                        self.retry_seconds)
            self.registered = False
            return False
        self.registered = True
        if new_key:
            log.info("WireGuard key rotated; new public key %s registered", public)
        return True

    def run(self) -> None:
        """Retry a registration that failed, and rotate every ``rotate_every`` seconds (the peers
        re-handshake once with the new key; the old one stops working at once)."""
        every = self.rotate_every
        next_rotation = time.monotonic() + every if every > 0 else None
        while True:
            wait = self.retry_seconds  # also how soon a failed registration is noticed
            if next_rotation is not None:
                wait = min(wait, max(0.0, next_rotation - time.monotonic()))
            if self.stop.wait(wait):
                return
            client = self.current_client()
            if client is None:
                continue  # not enrolled yet: enrolment registers the key
            if next_rotation is not None and time.monotonic() >= next_rotation:
                if self.register(client, new_key=True):
                    next_rotation = time.monotonic() + every
            elif not self.registered:
                self.register(client)

