"""The agent request signature (stockade.agent_signature) and the controller's replay/clone memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stockade import agent_signature as sig
from stockade.controller.services.agent_keys import AgentKeyRing
from stockade.controller.services.auth import NotAuthenticatedError

FIELDS = sig.SignedFields("a1b2c3d4e5f60718", "PUT", "/api/v1/agents/a1b2c3d4e5f60718/interfaces?x=1",
                          1_800_000_000, "0" * 32, "f" * 32)


def headers_of(signed: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in signed.items()}


def test_every_signed_field_and_the_body_are_covered() -> None:
    key = sig.new_private_key()
    pub = sig.parse_public_key(sig.public_key_text(key))
    signed = headers_of(sig.sign_request(key, FIELDS, b'{"a":1}'))
    fields, signature = sig.read_signed_fields(FIELDS.agent_id, FIELDS.method, FIELDS.target, signed)
    assert fields == FIELDS
    sig.verify(pub, fields, b'{"a":1}', signature)
    with pytest.raises(sig.SignatureError):
        sig.verify(pub, fields, b'{"a":2}', signature)
    for change in ({"agent_id": "ffffffffffffffff"}, {"method": "POST"}, {"target": FIELDS.target + "2"},
                   {"timestamp": FIELDS.timestamp + 1}, {"nonce": "1" * 32}, {"instance": "e" * 32}):
        with pytest.raises(sig.SignatureError, match="bad request signature"):
            sig.verify(pub, replace(FIELDS, **change), b'{"a":1}', signature)  # type: ignore[arg-type]
    other = sig.parse_public_key(sig.public_key_text(sig.new_private_key()))
    with pytest.raises(sig.SignatureError):
        sig.verify(other, fields, b'{"a":1}', signature)


@pytest.mark.parametrize(("header", "value", "message"), [
    (sig.TIMESTAMP_HEADER, "-5", "unix seconds"),
    (sig.NONCE_HEADER, "XYZ", "hex"),
    (sig.INSTANCE_HEADER, "0" * 31, "hex"),
    (sig.SIGNATURE_HEADER, "AAAA", "64 bytes"),
    (sig.SIGNATURE_HEADER, "!!", "base64"),
])
def test_malformed_headers_are_named(header: str, value: str, message: str) -> None:
    signed = headers_of(sig.sign_request(sig.new_private_key(), FIELDS, b""))
    signed[header.lower()] = value
    with pytest.raises(sig.SignatureError, match=message):
        sig.read_signed_fields(FIELDS.agent_id, FIELDS.method, FIELDS.target, signed)
    del signed[header.lower()]
    with pytest.raises(sig.SignatureError, match="missing"):
        sig.read_signed_fields(FIELDS.agent_id, FIELDS.method, FIELDS.target, signed)


def test_keys_off_the_curve_or_of_small_order_are_refused() -> None:
    for _ in range(50):
        assert not sig.is_weak_public_key(sig.b64decode(sig.public_key_text(sig.new_private_key())))
    weak = [bytes(32), b"\x01" + bytes(31), b"\xec" + b"\xff" * 30 + b"\x7f", b"\xed" + b"\xff" * 30 + b"\x7f",
            bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
            bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")]
    off_curve = b"\x02" + bytes(31)  # y = 2: x^2 has no square root
    for raw in [*weak, off_curve]:
        with pytest.raises(sig.SignatureError, match="small order"):
            sig.parse_public_key(sig.b64encode(raw))


def test_rotation_proof_is_bound_to_agent_and_key() -> None:
    new = sig.new_private_key()
    text = sig.public_key_text(new)
    proof = sig.b64encode(new.sign(sig.rotation_message("agent1", text)))
    sig.verify_rotation("agent1", text, proof)
    with pytest.raises(sig.SignatureError, match="proof"):
        sig.verify_rotation("agent2", text, proof)


def test_nonces_are_refused_inside_the_window_and_forgotten_after_it() -> None:
    ring = AgentKeyRing(None, freshness=120)  # type: ignore[arg-type]  (no database needed here)
    assert ring._remember("a", "1" * 32, "i" * 32, 1000.0) is None
    with pytest.raises(NotAuthenticatedError, match="replayed"):
        ring._remember("a", "1" * 32, "i" * 32, 1100.0)
    ring._remember("b", "1" * 32, "i" * 32, 1100.0)  # per agent
    ring._remember("a", "2" * 32, "i" * 32, 1300.0)  # past 2 x freshness: the first nonce is forgotten
    assert "1" * 32 not in ring._seen["a"].nonces


def test_a_restart_is_not_a_clone_but_taking_turns_is() -> None:
    ring = AgentKeyRing(None)  # type: ignore[arg-type]
    t = 1000.0
    for i, inst in enumerate(["a", "a", "b", "b", "c"]):  # two restarts
        assert ring._remember("x", f"{i:032x}", inst * 32, t) is None
    assert ring._remember("x", f"{9:032x}", "b" * 32, t) == "c" * 32  # b is back: two processes
    assert ring._remember("x", f"{10:032x}", "c" * 32, t) is None  # reported once
    ring.clear_clone("x")
    assert ring._remember("x", f"{11:032x}", "d" * 32, t) is None


def test_probation_of_a_new_process() -> None:
    now = [1000.0]
    ring = AgentKeyRing(None, probation=45, clock=lambda: now[0])  # type: ignore[arg-type]
    ring._remember("x", "1" * 32, "a" * 32, now[0])
    assert not ring.on_probation("x", "a" * 32)  # the first process of an agent: no one to compare with
    now[0] += 10
    ring._remember("x", "2" * 32, "b" * 32, now[0])  # took over 10 s after a was heard
    assert ring.on_probation("x", "b" * 32) and not ring.on_probation("x", "a" * 32)
    ring.hold("x", "b" * 32)
    assert not ring._release_due("x", "b" * 32, now[0] + 44)
    assert ring._release_due("x", "b" * 32, now[0] + 46) and not ring._release_due("x", "b" * 32, now[0] + 47)
    now[0] += 100
    assert not ring.on_probation("x", "b" * 32)
    now[0] += 100
    ring._remember("x", "3" * 32, "c" * 32, now[0])  # after a long silence (agent down): no probation
    assert not ring.on_probation("x", "c" * 32)
