"""The session proof's format (:mod:`stockade.agent_session`): both sides derive one key, bound to
everything the exchange names; a MAC covers what a signature covers and cannot pass for one."""

from __future__ import annotations

import pytest

from stockade import agent_session as sess
from stockade import agent_signature as sig

AGENT = "0123456789abcdef"
FIELDS = sig.SignedFields(AGENT, "POST", "/api/v1/agents/x/ack", 1_800_000_000, "a" * 32, "b" * 32)


def _pair(session_id: str = "S" * 24, agent_key: str = "K" * 43) -> tuple[bytes, bytes]:
    agent, controller = sess.new_exchange_key(), sess.new_exchange_key()
    a_text, c_text = sess.exchange_public_text(agent), sess.exchange_public_text(controller)
    kw = {"session_id": session_id, "agent_id": AGENT, "agent_key_text": agent_key,
          "agent_exchange_text": a_text, "controller_exchange_text": c_text}
    return sess.derive_session_key(agent, c_text, **kw), sess.derive_session_key(controller, a_text, **kw)


def test_both_sides_derive_the_same_key_and_it_is_fresh_each_time() -> None:
    a, c = _pair()
    assert a == c and len(a) == 32
    assert _pair()[0] != a  # fresh exchange keys: a fresh K


def test_the_key_is_bound_to_the_session_and_the_agents_key() -> None:
    agent, controller = sess.new_exchange_key(), sess.new_exchange_key()
    a_text, c_text = sess.exchange_public_text(agent), sess.exchange_public_text(controller)
    base = {"session_id": "S" * 24, "agent_id": AGENT, "agent_key_text": "K" * 43,
            "agent_exchange_text": a_text, "controller_exchange_text": c_text}
    k = sess.derive_session_key(agent, c_text, **base)
    for field, other in (("session_id", "T" * 24), ("agent_id", "f" * 16), ("agent_key_text", "L" * 43)):
        assert sess.derive_session_key(agent, c_text, **{**base, field: other}) != k, field


def test_a_small_order_exchange_key_is_refused() -> None:
    with pytest.raises(sig.SignatureError, match="unusable"):
        sess.derive_session_key(sess.new_exchange_key(), sig.b64encode(bytes(32)), session_id="S" * 24,
                                agent_id=AGENT, agent_key_text="K" * 43, agent_exchange_text="x",
                                controller_exchange_text="y")


def test_the_mac_message_has_its_own_domain_and_names_the_session() -> None:
    digest = sig.body_digest(b"{}")
    message = sess.mac_message("S" * 24, FIELDS, digest)
    assert message != FIELDS.message(digest) and message.startswith(sess.MAC_DOMAIN.encode() + b"\n")
    assert sess.mac_message("T" * 24, FIELDS, digest) != message


def _headers(**extra: str) -> dict[str, str]:
    h = sess.mac_request(bytes(32), "S" * 24, FIELDS, b"{}")
    h.update(extra)
    return {k.lower(): v for k, v in h.items()}


def test_read_proof_takes_one_proof_whole() -> None:
    proof = sess.read_proof(AGENT, "POST", FIELDS.target, _headers())
    assert proof.session == "S" * 24 and proof.signature is None and proof.fields == FIELDS
    sess.check_mac(bytes(32), proof, b"{}")
    with pytest.raises(sig.SignatureError, match="bad request MAC"):
        sess.check_mac(bytes(32), proof, b"{ }")
    with pytest.raises(sig.SignatureError, match="send one proof"):
        sess.read_proof(AGENT, "POST", FIELDS.target, _headers(**{sig.SIGNATURE_HEADER: "A" * 86}))
    half = _headers()
    del half[sess.MAC_HEADER.lower()]
    with pytest.raises(sig.SignatureError, match="go together"):
        sess.read_proof(AGENT, "POST", FIELDS.target, half)
    with pytest.raises(sig.SignatureError, match="24 base64url"):
        sess.read_proof(AGENT, "POST", FIELDS.target, _headers(**{sess.SESSION_HEADER: "S" * 23 + "!"}))
    with pytest.raises(sig.SignatureError, match="32 bytes"):
        sess.read_proof(AGENT, "POST", FIELDS.target, _headers(**{sess.MAC_HEADER: "AAAA"}))
    none = {k: v for k, v in _headers().items() if k not in (sess.SESSION_HEADER.lower(), sess.MAC_HEADER.lower())}
    with pytest.raises(sig.SignatureError, match="signs its requests"):
        sess.read_proof(AGENT, "POST", FIELDS.target, none)
