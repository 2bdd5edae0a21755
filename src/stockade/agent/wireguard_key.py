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
import os
from pathlib import Path

from stockade.agent.state import WIREGUARD_KEY_FILE


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
