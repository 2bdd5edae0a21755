"""The agent's state directory: its identity, the controller's CA and the policy cache.

Layout (directory mode 0700, every file mode 0600, every write atomic: a temporary file
in the same directory, fsync, rename)::

    /var/lib/stockade-agent/
        credential.json   {"controller": URL, "agent_id": ..., "token": ..., "workload": ...}
        agent-key.pem     the agent's Ed25519 private key (PKCS#8): made here, never sent anywhere;
                          every request is signed with it (stockade.agent_signature)
        agent-key.next.pem  only during a key rotation (promoted once the controller took it)
        instance          the running agent process's instance id (CLI commands reuse it)
        ca.pem            the controller's CA certificate (absent with --insecure-http)
        policy.json       {"revision": N, "policy": <HostPolicy JSON>} last applied policy
        activation-code   only between `stockade agent install --activation-code-file` and enrolment

The cache is what the agent enforces at start-up, before it talks to the controller, so
a restart while the controller is down still enforces the last policy it applied.
A cache that cannot be parsed is reported as :class:`~stockade.errors.ValidationError`
and never half-applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stockade.compiler.ir import HostPolicy, host_policy_from_dict, host_policy_to_dict
from stockade.errors import Issue, ValidationError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_STATE_DIR = Path("/var/lib/stockade-agent")
CREDENTIAL_FILE = "credential.json"
CA_FILE = "ca.pem"
POLICY_FILE = "policy.json"
CODE_FILE = "activation-code"  # written by `stockade agent install`, deleted once enrolled
KEY_FILE = "agent-key.pem"
NEXT_KEY_FILE = "agent-key.next.pem"
INSTANCE_FILE = "instance"
BACKEND_FILE = "backend"
_BACKEND_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
WIREGUARD_KEY_FILE = "wireguard.key"  # the host's WireGuard private key (stockade.agent.wireguard_key)
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class Credential:
    """The identity the controller issued at enrolment."""

    controller: str  # base URL, e.g. https://10.0.0.1:8443
    agent_id: str
    token: str  # bearer token; never logged
    workload: str  # the workload name the controller bound this agent to
    key_file: Path | None = None  # the private key requests are signed with (None: enrolled before keys)

    def __repr__(self) -> str:
        return f"Credential(controller={self.controller!r}, agent_id={self.agent_id!r}, workload={self.workload!r})"


@dataclass(frozen=True)
class CachedPolicy:
    """The last policy this agent applied, with the controller revision it came from."""

    revision: int
    policy: HostPolicy


def _bad(path: Path, message: str) -> ValidationError:
    return ValidationError([Issue(str(path), 0, "", message)])


class StateDir:
    """Reads and atomically writes the agent's files under ``path``."""

    def __init__(self, path: Path | str = DEFAULT_STATE_DIR, *, durable: bool = True) -> None:
        """``durable=False`` skips the fsyncs (writes stay atomic: temp file + rename). For state that
        cannot outlive a crash of the machine anyway: a Kubernetes pod's (its namespace dies with the
        machine, and the node agent re-enrols a pod whose files are gone)."""
        self.path = Path(path)
        self.durable = durable

    # ---- plumbing -------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the directory (0700) if needed, and tighten its mode if it is looser."""
        self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if self.path.stat().st_mode & 0o777 != DIR_MODE:
            self.path.chmod(DIR_MODE)

    def _write(self, name: str, data: bytes) -> None:
        self.ensure()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if not self.durable:
            return
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def _read_json(self, name: str) -> dict[str, Any] | None:
        raw = self._read(name)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise _bad(self.path / name, f"not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _bad(self.path / name, "expected a JSON object")
        return data

    # ---- credential ---------------------------------------------------------------------
    def load_credential(self) -> Credential | None:
        data = self._read_json(CREDENTIAL_FILE)
        if data is None:
            return None
        try:
            return Credential(
                controller=str(data["controller"]),
                agent_id=str(data["agent_id"]),
                token=str(data["token"]),
                workload=str(data["workload"]),
                key_file=self.key_path if self.key_path.exists() else None,
            )
        except KeyError as exc:
            raise _bad(self.path / CREDENTIAL_FILE, f"missing field {exc}") from exc

    def save_credential(self, cred: Credential) -> None:
        body = {
            "controller": cred.controller,
            "agent_id": cred.agent_id,
            "token": cred.token,
            "workload": cred.workload,
        }
        self._write(CREDENTIAL_FILE, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())

    # ---- the agent's key --------------------------------------------------------------------
    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    @property
    def next_key_path(self) -> Path:
        return self.path / NEXT_KEY_FILE

    # The key functions import cryptography (~60 ms) when called, not at module import: this
    # module is on the path that enforces the cached policy at boot, before any key is needed.
    def load_key(self) -> Ed25519PrivateKey | None:
        from stockade import agent_signature as sig

        raw = self._read(KEY_FILE)
        if raw is None:
            return None
        try:
            return sig.load_private_key_pem(raw)
        except sig.SignatureError as exc:
            raise _bad(self.key_path, str(exc)) from exc

    def load_or_create_key(self) -> Ed25519PrivateKey:
        """The agent's key, made (0600) on first use."""
        from stockade import agent_signature as sig

        key = self.load_key()
        if key is None:
            key = sig.new_private_key()
            self._write(KEY_FILE, sig.private_key_pem(key))
        return key

    def save_next_key(self, key: Ed25519PrivateKey) -> None:
        from stockade import agent_signature as sig

        self._write(NEXT_KEY_FILE, sig.private_key_pem(key))

    def load_next_key(self) -> Ed25519PrivateKey | None:
        """A rotation's new key, if one is under way (its outcome was not known)."""
        from stockade import agent_signature as sig

        raw = self._read(NEXT_KEY_FILE)
        try:
            return sig.load_private_key_pem(raw) if raw is not None else None
        except sig.SignatureError as exc:
            raise _bad(self.next_key_path, str(exc)) from exc

    def promote_next_key(self) -> bool:
        """Make the rotation's new key the key (atomic rename); False if there is none."""
        try:
            os.replace(self.next_key_path, self.key_path)
        except FileNotFoundError:
            return False
        return True

    def drop_next_key(self) -> None:
        self.next_key_path.unlink(missing_ok=True)

    # ---- process instance -------------------------------------------------------------------
    def save_instance(self, instance: str) -> None:
        self._write(INSTANCE_FILE, instance.encode())

    def load_instance(self) -> str | None:
        raw = self._read(INSTANCE_FILE)
        return raw.decode().strip() or None if raw is not None else None

    # ---- the backend enforcing ------------------------------------------------------------
    def save_backend(self, name: str) -> None:
        """The backend whose rules are in force (a later start with another --backend switches from it)."""
        if self.load_backend() != name:
            self._write(BACKEND_FILE, name.encode())

    def load_backend(self) -> str | None:
        raw = self._read(BACKEND_FILE)
        text = raw.decode(errors="replace").strip() if raw is not None else ""
        return text if _BACKEND_NAME.fullmatch(text) else None

    # ---- CA ----------------------------------------------------------------------------
    @property
    def ca_path(self) -> Path:
        return self.path / CA_FILE

    def load_ca(self) -> str | None:
        raw = self._read(CA_FILE)
        return raw.decode() if raw is not None else None

    def save_ca(self, pem: str) -> None:
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise _bad(self.ca_path, "not a PEM certificate")
        if self.load_ca() != pem:  # given again at every start (--ca-cert): no needless fsync
            self._write(CA_FILE, pem.encode())

    # ---- policy cache ------------------------------------------------------------------
    def load_policy(self) -> CachedPolicy | None:
        data = self._read_json(POLICY_FILE)
        if data is None:
            return None
        try:
            return CachedPolicy(int(data["revision"]), host_policy_from_dict(data["policy"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(self.path / POLICY_FILE, f"unusable cached policy: {exc!r}") from exc

    def save_policy(self, cached: CachedPolicy) -> None:
        body = {"revision": cached.revision, "policy": host_policy_to_dict(cached.policy)}
        self._write(POLICY_FILE, (json.dumps(body, sort_keys=True) + "\n").encode())

    # ---- activation code (kept out of the world-readable unit file) ------------------------
    def save_activation_code(self, code: str) -> None:
        self._write(CODE_FILE, code.strip().encode())

    def load_activation_code(self) -> str | None:
        raw = self._read(CODE_FILE)
        return raw.decode().strip() or None if raw is not None else None

    def clear_activation_code(self) -> None:
        (self.path / CODE_FILE).unlink(missing_ok=True)

    # ---- unenrolment ---------------------------------------------------------------------
    def wipe(self) -> None:
        """Delete the credential, key, CA and cache (``stockade agent uninstall``)."""
        for name in (CREDENTIAL_FILE, CA_FILE, POLICY_FILE, CODE_FILE, KEY_FILE, NEXT_KEY_FILE, INSTANCE_FILE,
                     WIREGUARD_KEY_FILE, BACKEND_FILE):
            (self.path / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()
