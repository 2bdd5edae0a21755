"""The pairing profile body codec: canonical bodies round-trip, every bad field is named."""

from __future__ import annotations

import datetime as dt

import pytest

from stockade.codec import bodies, pairing_body
from stockade.errors import ValidationError
from stockade.model.labels import Label
from stockade.model.pairing import PairingProfile
from stockade.model.workloads import EnforcementMode


def test_defaults_are_explicit_and_round_trip() -> None:
    p = bodies.decode("pairing_profile", {"name": "lab"})
    assert p == PairingProfile("lab")
    body = bodies.encode("pairing_profile", p)
    assert body == {"name": "lab", "labels": {}, "mode": "visibility", "expires_at": None, "max_uses": None,
                    "enabled": True, "description": "", "code_max_uses": 1, "code_ttl_seconds": 86400}
    assert bodies.decode("pairing_profile", body) == p


def test_canonical_labels_and_expiry_in_utc() -> None:
    p = pairing_body.decode({"name": "w", "labels": {"env": "prod", "app": "shop"}, "mode": "full",
                             "expires_at": "2027-01-01T05:00:00+05:00", "max_uses": 3})
    assert p.labels == (Label("app", "shop"), Label("env", "prod")) and p.mode is EnforcementMode.FULL
    assert p.expires_at == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    body = pairing_body.encode(p)
    assert list(body["labels"]) == ["app", "env"] and body["expires_at"] == "2027-01-01T00:00:00+00:00"
    assert pairing_body.decode(body) == p
    naive = pairing_body.decode({"name": "w", "expires_at": "2027-01-01T00:00:00"})
    assert naive.expires_at == p.expires_at


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "-x"}, "name"),
    ({"name": "k8s-node"}, "name"),  # reserved: the profile recorded on pod identities
    ({"name": "x", "labels": {"app": "bad value"}}, "labels.app"),
    ({"name": "x", "labels": ["app"]}, "labels"),
    ({"name": "x", "mode": "enforce"}, "mode"),
    ({"name": "x", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "x", "expires_at": 1700000000}, "expires_at"),
    ({"name": "x", "expires_at": "9999-12-31T23:00:00-05:00"}, "expires_at"),
    ({"name": "x", "max_uses": 0}, "max_uses"),
    ({"name": "x", "max_uses": True}, "max_uses"),
    ({"name": "x", "code_max_uses": None}, "code_max_uses"),
    ({"name": "x", "code_ttl_seconds": 59}, "code_ttl_seconds"),
    ({"name": "x", "enabled": "yes"}, "enabled"),
    ({"name": "x", "description": "d" * 1025}, "description"),
    ({"name": "x", "uses": 3}, "uses"),
])
def test_every_bad_field_is_named(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        pairing_body.decode(body)
    assert [i.field for i in err.value.issues] == [field]
