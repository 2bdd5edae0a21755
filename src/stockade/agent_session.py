"""Request proofs on a session bound to the agent's Ed25519 key: an HMAC instead of a signature.

Why: verifying an Ed25519 signature costs the controller ~80-115 us of CPU, the largest single
cost of an agent request (25,000 agents acknowledging a global change = 2-3 CPU-seconds). An
HMAC-SHA256 over the same canonical message costs ~2 us. The session keeps every guarantee of the
signature (:mod:`stockade.agent_signature`) because its key is only ever known to the holder of
the agent's Ed25519 private key and to the one controller replica that opened it:

1. ``POST /api/v1/agents/{id}/session {public_key}`` - **Ed25519-signed** (a session cannot open a
   session, and an agent without a key has nothing to bind one to). ``public_key``: the agent's
   fresh X25519 public key; being in the body, it is covered by the signature, so only the key's
   holder can have chosen it. The replica answers ``{session, public_key, expires_in}``: a random
   session id, its own fresh X25519 public key and the lifetime.
2. Both sides compute ``K = HKDF-SHA256(X25519(shared), salt = session id, info = SESSION_DOMAIN,
   agent id, the agent's Ed25519 public key, both X25519 public keys)``. The replica discards its
   X25519 private key at once and keeps K in memory only (never stored, never logged); the agent
   discards its own after deriving. A passive or relaying observer of the exchange learns neither
   private key, so not K; a replayed open request is refused (nonce) and useless anyway (no
   X25519 private key). Binding the Ed25519 key into ``info`` makes K worthless after a rotation.
3. A request on the session carries :data:`SESSION_HEADER` and :data:`MAC_HEADER` =
   base64url(HMAC-SHA256(K, :func:`mac_message`)) *instead of* the signature, with the same
   timestamp, nonce and instance headers. :func:`mac_message` is the signed message under its own
   domain string plus the session id, so a MAC can never be mistaken for (or turned into) a
   signature's message, nor moved to another session. The controller checks freshness, the nonce
   (replay), the instance (clones) exactly as for a signature; a request carrying both a
   signature and a MAC is refused (which one would count is ambiguous).

Choices, and why:

* K stays in the memory of the replica that opened the session (not in the database): a
  database reader (a backup, a replica of PostgreSQL) learns nothing that proves a request. The
  price: a request reaching another replica, or a restarted one, is answered 401
  ``UnknownSessionError`` (:data:`UNKNOWN_SESSION`) and the agent re-sends it signed, then opens
  a session there (at most one open per 30 s per client).
* The agent re-sends *any* request refused on a session signed, not only the unknown-session one:
  the signature's answer is then what its caller sees, exactly as before sessions (a revoked
  token, a rotated key with the interrupted-rotation retry, a stale clock).
* A session is bound to the agent process (instance) that opened it, so two processes sharing a
  credential still take turns on the instance check (clone detection), and to the Ed25519 key it
  was opened under (dropped when that key changes).
* Opening a session and rotating the key are signature-only: a leaked K can never extend itself
  or replace the key.
* An unknown session is routine (restart, failover, expiry), so it is not audited as a refused
  signature at once; it is audited if no proven request of that agent follows within 30 s (a
  copied token trying session ids gets reported, an agent recovering does not).

Shared by the agent (making MACs) and the controller (checking them) so the two never disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stockade import agent_signature as sig

SESSION_DOMAIN = "stockade-agent-session-v1"
MAC_DOMAIN = "stockade-agent-session-request-v1"
SESSION_HEADER = "X-Stockade-Session"
MAC_HEADER = "X-Stockade-MAC"
SESSION_SECONDS = 3600  # a session's lifetime (the agent opens a new one a little before)
UNKNOWN_SESSION = "UnknownSessionError"  # the 401 answer's ``error`` when the replica does not hold the session
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{24}$")


def new_session_id() -> str:
    return secrets.token_urlsafe(18)  # 144 random bits, 24 characters


def is_session_id(text: str) -> bool:
    return bool(_SESSION_ID.match(text))


def new_exchange_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def exchange_public_text(key: X25519PrivateKey) -> str:
    return sig.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def parse_exchange_key(text: str) -> X25519PublicKey:
    raw = sig.b64decode(text)
    if len(raw) != 32:
        raise sig.SignatureError("an X25519 public key is 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def derive_session_key(own: X25519PrivateKey, peer_text: str, *, session_id: str, agent_id: str,
                       agent_key_text: str, agent_exchange_text: str, controller_exchange_text: str) -> bytes:
    """K, as both sides compute it; :class:`~stockade.agent_signature.SignatureError` for a peer key
    of small order (the shared secret would be all zeros, known to anyone)."""
    try:
        shared = own.exchange(parse_exchange_key(peer_text))
    except ValueError as exc:
        raise sig.SignatureError(f"unusable X25519 public key: {exc}") from None
    info = "\n".join((SESSION_DOMAIN, agent_id, agent_key_text, agent_exchange_text, controller_exchange_text))
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=session_id.encode(), info=info.encode())
    return hkdf.derive(shared)


def mac_message(session_id: str, fields: sig.SignedFields, body_sha256: str) -> bytes:
    parts = (MAC_DOMAIN, session_id, fields.agent_id, fields.method.upper(), fields.target, str(fields.timestamp),
             fields.nonce, fields.instance, body_sha256)
    return "\n".join(parts).encode()


def request_mac(key: bytes, session_id: str, fields: sig.SignedFields, body: bytes) -> bytes:
    return hmac.new(key, mac_message(session_id, fields, sig.body_digest(body)), hashlib.sha256).digest()


def mac_request(key: bytes, session_id: str, fields: sig.SignedFields, body: bytes) -> dict[str, str]:
    """The headers that prove the holder of the session's key made this request."""
    return {sig.TIMESTAMP_HEADER: str(fields.timestamp), sig.NONCE_HEADER: fields.nonce,
            sig.INSTANCE_HEADER: fields.instance, SESSION_HEADER: session_id,
            MAC_HEADER: sig.b64encode(request_mac(key, session_id, fields, body))}


@dataclass(frozen=True)
class Proof:
    """One request's proof: a signature, or a session's MAC (never both)."""

    fields: sig.SignedFields
    signature: bytes | None = None
    session: str | None = None
    mac: bytes | None = None


def read_proof(agent_id: str, method: str, target: str, headers: dict[str, str]) -> Proof:
    """Parse the proof headers (lower-case names); :class:`~stockade.agent_signature.SignatureError`
    names what is wrong (missing, malformed, or a signature and a MAC together)."""
    has_sig, has_session = sig.SIGNATURE_HEADER.lower() in headers, SESSION_HEADER.lower() in headers
    has_mac = MAC_HEADER.lower() in headers
    if has_sig and (has_session or has_mac):
        raise sig.SignatureError(f"both {sig.SIGNATURE_HEADER} and {SESSION_HEADER}/{MAC_HEADER}: send one proof")
    if not (has_session or has_mac):
        fields, signature = sig.read_signed_fields(agent_id, method, target, headers)
        return Proof(fields, signature=signature)
    if not (has_session and has_mac):
        raise sig.SignatureError(f"{SESSION_HEADER} and {MAC_HEADER} go together")
    session = headers[SESSION_HEADER.lower()]
    if not is_session_id(session):
        raise sig.SignatureError(f"{SESSION_HEADER}: expected 24 base64url characters")
    mac = sig.b64decode(headers[MAC_HEADER.lower()])
    if len(mac) != 32:
        raise sig.SignatureError(f"{MAC_HEADER}: an HMAC-SHA256 is 32 bytes")
    return Proof(sig.read_fields(agent_id, method, target, headers), session=session, mac=mac)


def check_mac(key: bytes, proof: Proof, body: bytes) -> None:
    assert proof.session is not None and proof.mac is not None
    if not hmac.compare_digest(request_mac(key, proof.session, proof.fields, body), proof.mac):
        raise sig.SignatureError("bad request MAC")
