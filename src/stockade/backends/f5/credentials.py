"""Device credentials encrypted at rest, for the controller (F5 BIG-IP and other devices).

:class:`EncryptedCredentialStore` keeps one JSON file mapping a device name to a Fernet
token (AES-128-CBC + HMAC-SHA256, from ``cryptography``) holding that device's username and
password. The key lives in a separate key file created with mode 0600 (``O_CREAT|O_EXCL``,
so it is never world-readable, even briefly) and the store refuses a key file that group or
others can read. The store file is written atomically (temporary file + rename), also 0600.
A wrong key or a tampered token is an AuthError; plaintext never reaches the disk.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from stockade.errors import AuthError, NotFoundError


@dataclass(frozen=True)
class DeviceCredential:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password
        return f"DeviceCredential(username={self.username!r}, password=***)"

    def as_auth(self) -> tuple[str, str]:
        return self.username, self.password


def create_key_file(path: Path) -> None:
    """Write a new Fernet key to ``path`` with mode 0600; refuses to overwrite one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key())


def _load_key(path: Path) -> Fernet:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise AuthError(f"credential key file {path} does not exist") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise AuthError(f"credential key file {path} is accessible by group or others (mode {st.st_mode & 0o777:o})")
    try:
        return Fernet(path.read_bytes().strip())
    except ValueError as exc:
        raise AuthError(f"credential key file {path} does not hold a valid key") from exc


class EncryptedCredentialStore:
    """Device name -> DeviceCredential, encrypted with the key in ``key_path``."""

    def __init__(self, path: Path, key_path: Path) -> None:
        self.path = Path(path)
        self.key_path = Path(key_path)
        self._fernet = _load_key(self.key_path)

    def _read(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict):
            raise AuthError(f"credential store {self.path} is malformed")
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put(self, device: str, credential: DeviceCredential) -> None:
        data = self._read()
        plain = json.dumps({"username": credential.username, "password": credential.password}).encode()
        data[device] = self._fernet.encrypt(plain).decode()
        self._write(data)

    def get(self, device: str) -> DeviceCredential:
        token = self._read().get(device)
        if token is None:
            raise NotFoundError(f"no credential stored for device {device!r}")
        try:
            plain = json.loads(self._fernet.decrypt(token.encode()))
        except InvalidToken as exc:
            raise AuthError(f"credential for device {device!r} cannot be decrypted with this key") from exc
        return DeviceCredential(str(plain["username"]), str(plain["password"]))

    def delete(self, device: str) -> None:
        data = self._read()
        if data.pop(device, None) is not None:
            self._write(data)

    def devices(self) -> tuple[str, ...]:
        return tuple(sorted(self._read()))
