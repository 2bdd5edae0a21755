"""The proof of possession every agent request carries: one canonical message, signed with Ed25519.

An agent's bearer token names the agent; the signature proves that the request comes from the
host holding the agent's private key, which is generated on that host at enrolment (or at the
first start after an upgrade) and never leaves it. A token copied off a host is therefore worth
nothing without the key file, and a captured request cannot be replayed.

The signed message (UTF-8, fields joined by ``\\n``)::

    stockade-agent-request-v1
    <agent id>
    <METHOD>
    <path?query exactly as sent on the wire>
    <timestamp: unix seconds, integer>
    <nonce: 32 hex digits, fresh per request>
    <instance: 32 hex digits, fresh per agent process>
    <SHA-256 of the body, hex>

carried in the headers :data:`TIMESTAMP_HEADER`, :data:`NONCE_HEADER`, :data:`INSTANCE_HEADER`
and :data:`SIGNATURE_HEADER` (base64url Ed25519 signature, no padding). The controller accepts a
timestamp within :data:`FRESHNESS_SECONDS` of its clock and refuses a nonce it has already seen
inside that window. The instance identifies one running agent process: two processes speaking
with one credential (a cloned host) show up as instances taking turns.

Shared by the agent (signing) and the controller (verifying), so the two can never disagree on
the format. Keys travel as base64url of the 32 raw public-key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stockade.errors import AuthError

DOMAIN = "stockade-agent-request-v1"
ROTATION_DOMAIN = "stockade-agent-key-rotation-v1"
TIMESTAMP_HEADER = "X-Stockade-Timestamp"
NONCE_HEADER = "X-Stockade-Nonce"
INSTANCE_HEADER = "X-Stockade-Instance"
SIGNATURE_HEADER = "X-Stockade-Signature"
FRESHNESS_SECONDS = 120
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class SignatureError(AuthError):
    """A missing, malformed, stale, replayed or wrong request signature."""


def b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"not base64url: {exc}") from exc


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as sent to the controller: base64url of its 32 raw bytes."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64encode(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P


def _point(raw: bytes) -> tuple[int, int] | None:
    """Decode an Edwards25519 point (RFC 8032, 5.1.3); None if not a canonical point on the curve."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P == (-u) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if v * x * x % _P != u:
        return None
    if x == 0 and sign:
        return None
    return (_P - x if x % 2 != sign else x), y


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    x, y = pt
    t = _D * x * x * y * y % _P
    return ((2 * x * y) * pow(1 + t, _P - 2, _P) % _P, (y * y + x * x) * pow(1 - t, _P - 2, _P) % _P)


def is_weak_public_key(raw: bytes) -> bool:
    """Not a point, or a point of small order (8P = identity): with such a key a signature can be
    forged without the private key, so it is never accepted."""
    pt = _point(raw)
    if pt is None:
        return True
    for _ in range(3):
        pt = _double(pt)
    return pt == (0, 1)


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from :func:`public_key_text`'s form; :class:`SignatureError` if it is not one."""
    raw = b64decode(text)
    if len(raw) != 32:
        raise SignatureError("an Ed25519 public key is 32 bytes")
    if is_weak_public_key(raw):
        raise SignatureError("not a usable Ed25519 public key (off the curve or of small order)")
    return Ed25519PublicKey.from_public_bytes(raw)


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key_pem(pem: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError("the agent key must be Ed25519")
    return key


def new_nonce() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class SignedFields:
    """What one request's signature covers (besides the body, which enters as its digest)."""

    agent_id: str
    method: str
    target: str  # path?query as sent
    timestamp: int
    nonce: str
    instance: str

    def message(self, body_sha256: str) -> bytes:
        parts = (DOMAIN, self.agent_id, self.method.upper(), self.target, str(self.timestamp), self.nonce,
                 self.instance, body_sha256)
        return "\n".join(parts).encode()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign_request(key: Ed25519PrivateKey, fields: SignedFields, body: bytes) -> dict[str, str]:
    """The headers that prove ``key`` signed this request."""
    sig = key.sign(fields.message(body_digest(body)))
    return {TIMESTAMP_HEADER: str(fields.timestamp), NONCE_HEADER: fields.nonce,
            INSTANCE_HEADER: fields.instance, SIGNATURE_HEADER: b64encode(sig)}


def read_fields(agent_id: str, method: str, target: str, headers: dict[str, str]) -> SignedFields:
    """The timestamp, nonce and instance headers (lower-case names) every proof carries."""
    missing = [h for h in (TIMESTAMP_HEADER, NONCE_HEADER, INSTANCE_HEADER) if h.lower() not in headers]
    if missing:
        raise SignatureError(f"this agent signs its requests: missing {', '.join(missing)}")
    ts_text = headers[TIMESTAMP_HEADER.lower()]
    if not ts_text.isdigit() or len(ts_text) > 12:
        raise SignatureError(f"{TIMESTAMP_HEADER}: expected unix seconds")
    nonce, instance = headers[NONCE_HEADER.lower()], headers[INSTANCE_HEADER.lower()]
    if not _HEX32.match(nonce):
        raise SignatureError(f"{NONCE_HEADER}: expected 32 lower-case hex digits")
    if not _HEX32.match(instance):
        raise SignatureError(f"{INSTANCE_HEADER}: expected 32 lower-case hex digits")
    return SignedFields(agent_id, method, target, int(ts_text), nonce, instance)


def read_signed_fields(agent_id: str, method: str, target: str, headers: dict[str, str]) -> tuple[SignedFields, bytes]:
    """Parse the signature headers (lower-case names); :class:`SignatureError` names what is wrong."""
    missing = [h for h in (TIMESTAMP_HEADER, NONCE_HEADER, INSTANCE_HEADER, SIGNATURE_HEADER)
               if h.lower() not in headers]
    if missing:
        raise SignatureError(f"this agent signs its requests: missing {', '.join(missing)}")
    fields = read_fields(agent_id, method, target, headers)
    sig = b64decode(headers[SIGNATURE_HEADER.lower()])
    if len(sig) != 64:
        raise SignatureError(f"{SIGNATURE_HEADER}: an Ed25519 signature is 64 bytes")
    return fields, sig


def verify(key: Ed25519PublicKey, fields: SignedFields, body: bytes, signature: bytes) -> None:
    try:
        key.verify(signature, fields.message(body_digest(body)))
    except InvalidSignature:
        raise SignatureError("bad request signature") from None


def rotation_message(agent_id: str, new_public_key: str) -> bytes:
    """What the *new* key signs when it replaces the old one (proof that the agent holds it)."""
    return "\n".join((ROTATION_DOMAIN, agent_id, new_public_key)).encode()


def verify_rotation(agent_id: str, new_public_key: str, proof: str) -> Ed25519PublicKey:
    key = parse_public_key(new_public_key)
    try:
        key.verify(b64decode(proof), rotation_message(agent_id, new_public_key))
    except InvalidSignature:
        raise SignatureError("proof: not signed by the new key") from None
    return key
