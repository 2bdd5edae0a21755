"""F5 AFM backend against the FAKE iControl REST service (tests/fakes/f5_icontrol.py) on
127.0.0.1: transaction semantics, idempotence, dry-run, rollback, fail-closed features, and
the encrypted credential store."""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stockade.backends.f5.backend import F5Backend
from stockade.backends.f5.credentials import DeviceCredential, EncryptedCredentialStore, create_key_file
from stockade.compiler.ir import Direction, HostPolicy, HostRule, SetDelta
from stockade.errors import ApplyError, AuthError, NotFoundError, UnsupportedFeatureError
from stockade.model import Failsafe, Family
from tests.fakes.f5_icontrol import FakeICR, running_fake_icr
from tests.golden.nft_cases import ALLOW, CASES, DB, FULL, IN, OUT, WEB, host, tcp

VS = "/Common/vs_web"


def inbound(name: str) -> HostPolicy:
    hp = next(c for c in CASES if c.name == name).policy
    return replace(hp, rules=tuple(r for r in hp.rules if r.direction is Direction.INBOUND))


@pytest.fixture
def device() -> Iterator[tuple[FakeICR, F5Backend]]:
    with running_fake_icr() as (dev, url):
        dev.add_virtual(VS)
        backend = F5Backend(url, VS, ("admin", "secret"))
        try:
            yield dev, backend
        finally:
            backend.close()


def writes(dev: FakeICR) -> list[tuple[str, str]]:
    return [r for r in dev.requests if r[0] != "GET"]


def test_apply_creates_and_attaches_in_one_transaction(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    art = backend.render(inbound("selective"))
    backend.apply(art)
    cfg = dev.config
    assert set(cfg.addressLists) == {"/Common/stk_vs_web_pweb00000001", "/Common/stk_vs_web_pcorp0000004"}
    assert cfg.virtuals[VS]["fwEnforcedPolicy"] == "/Common/stk_vs_web"
    assert "fwStagedPolicy" not in cfg.virtuals[VS]
    rules = cfg.policies["/Common/stk_vs_web"]["rules"]
    assert [r["description"] for r in rules][-1] == "default" and rules[-1]["action"] == "accept"
    w = writes(dev)
    assert w[0] == ("POST", "/mgmt/tm/transaction") and w[-1][0] == "PATCH" and w[-1][1].startswith("/mgmt/tm/tr")
    assert len([x for x in w if x == ("POST", "/mgmt/tm/transaction")]) == 1


def test_nothing_visible_before_commit(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    before = copy.deepcopy(dev.config)
    seen: list[Any] = []
    original = backend.client.request

    def spy(method: str, path: str, body: dict[str, Any] | None = None, transaction: int | None = None) -> Any:
        if body == {"state": "VALIDATING"}:
            # everything is queued now: a reader still sees the old configuration
            _status, listing = original("GET", "/mgmt/tm/security/firewall/address-list")
            seen.append((copy.deepcopy(dev.config), listing))
        return original(method, path, body, transaction)

    backend.client.request = spy  # type: ignore[method-assign]
    backend.apply(backend.render(inbound("full_basic")))
    (config_at_commit, listing), = seen
    assert config_at_commit == before and listing == {"items": []}
    assert dev.config != before


def test_second_apply_is_a_no_op(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    art = backend.render(inbound("visibility"))
    backend.apply(art)
    count = len(writes(dev))
    backend.apply(backend.render(inbound("visibility")))
    assert len(writes(dev)) == count, "an unchanged policy must not open a transaction"
    assert backend.dry_run(art).empty
    assert dev.config.virtuals[VS]["fwStagedPolicy"] == "/Common/stk_vs_web"
    assert "fwEnforcedPolicy" not in dev.config.virtuals[VS]


def test_dry_run_diff_writes_nothing(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    backend.apply(backend.render(inbound("full_basic")))
    count = len(writes(dev))
    hp = inbound("full_basic")
    web = replace(hp.sets[2], members=(*hp.sets[2].members, ipaddress.ip_network("10.0.0.99/32")))
    assert hp.sets[2].name == WEB[0].name and hp.sets[2].family is Family.V4
    changed = replace(hp, sets=(*hp.sets[:2], web, *hp.sets[3:]))
    plan = backend.dry_run(backend.render(changed))
    assert len(writes(dev)) == count
    text = plan.to_text()
    assert "~ update address-list /Common/stk_vs_web_pweb00000001" in text and '+  "10.0.0.99/32"' in text
    assert len(plan.changes) == 1


def test_failed_commit_changes_nothing(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    backend.apply(backend.render(inbound("full_basic")))
    before = copy.deepcopy(dev.config)
    dev.fail_when = "/firewall/policy/"  # the policy update, queued after the new address list
    with pytest.raises(ApplyError, match="nothing was changed"):
        backend.apply(backend.render(inbound("override_deny")))
    assert dev.config == before, "all or nothing: the lists created earlier in the transaction are gone too"
    dev.fail_when = None
    backend.apply(backend.render(inbound("override_deny")))
    assert dev.config != before


def test_queue_refusal_discards_the_transaction(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    art = backend.render(inbound("full_basic"))
    before = copy.deepcopy(dev.config)
    original = backend.client.request

    def refuse(method: str, path: str, body: dict[str, Any] | None = None, transaction: int | None = None) -> Any:
        if transaction is not None and "policy" in path:
            return 400, {"message": "refused while queueing"}
        return original(method, path, body, transaction)

    backend.client.request = refuse  # type: ignore[method-assign]
    with pytest.raises(ApplyError, match="refused while queueing"):
        backend.apply(art)
    assert dev.config == before and dev.transactions == {}


def test_orphans_are_deleted_and_remove_cleans_up(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    dev.config.addressLists["/Common/other_team_list"] = {"name": "other_team_list", "partition": "Common",
                                                           "addresses": [{"name": "192.0.2.1"}]}  # fmt: skip
    backend.apply(backend.render(inbound("override_deny")))
    backend.apply(backend.render(inbound("full_basic")))
    assert "/Common/stk_vs_web_pbad00000003" not in dev.config.addressLists
    backend.remove()
    assert dev.config.policies == {} and set(dev.config.addressLists) == {"/Common/other_team_list"}
    assert dev.config.portLists == {} and "fwEnforcedPolicy" not in dev.config.virtuals[VS]
    assert backend.read_back() == ""


def test_read_back_matches_render(device: tuple[FakeICR, F5Backend]) -> None:
    _, backend = device
    backend.apply(backend.render(inbound("port_sets")))
    doc = json.loads(backend.read_back())
    assert doc["virtual /Common/vs_web"] == {"fwEnforcedPolicy": "/Common/stk_vs_web", "fwStagedPolicy": "none"}
    assert any(r["destinationPortLists"] for r in doc["policy /Common/stk_vs_web"]["rules"])


def test_outbound_rule_fails_closed_naming_rule(device: tuple[FakeICR, F5Backend]) -> None:
    _, backend = device
    hp = next(c for c in CASES if c.name == "full_basic").policy
    with pytest.raises(UnsupportedFeatureError) as info:
        backend.render(hp)
    assert info.value.rule_id == "ruleset/shop/1" and info.value.feature == "outbound rules"
    with pytest.raises(UnsupportedFeatureError, match="incremental address-set deltas"):
        backend.apply_delta((SetDelta("x", Family.V4, (ipaddress.ip_network("10.0.0.1/32"),), ()),))


def test_controller_failsafe_does_not_apply_to_a_virtual_server(device: tuple[FakeICR, F5Backend]) -> None:
    _, backend = device
    hp = host(FULL, [HostRule(ALLOW, IN, "ruleset/a/0", WEB[0].name, (tcp(443),))], [WEB],
              Failsafe(controller=(ipaddress.ip_network("10.9.0.1/32"),)))  # fmt: skip
    art = backend.render(hp)
    assert not any(r.description == "failsafe:controller" for r in art.rules)
    out = host(FULL, [HostRule(ALLOW, OUT, "ruleset/a/1", DB[0].name, (tcp(5432),))], [DB])
    with pytest.raises(UnsupportedFeatureError):
        backend.render(out)


def test_wrong_credentials_are_auth_errors() -> None:
    with running_fake_icr() as (dev, url):
        dev.add_virtual(VS)
        backend = F5Backend(url, VS, ("admin", "wrong"))
        with pytest.raises(AuthError):
            backend.apply(backend.render(inbound("full_basic")))
        backend.close()


def test_missing_virtual_server(device: tuple[FakeICR, F5Backend]) -> None:
    dev, backend = device
    del dev.config.virtuals[VS]
    with pytest.raises(ApplyError, match="does not exist"):
        backend.apply(backend.render(inbound("full_basic")))


def test_fake_checks_field_shapes() -> None:
    """The fake is strict: a renderer mistake in a field shape would be refused."""
    from tests.fakes.f5_icontrol import Config, ICRError, execute

    cfg = Config()
    bad_bodies = [
        ("address-list", {"name": "a", "addresses": ["10.0.0.1"]}),
        ("address-list", {"name": "a", "addresses": []}),
        ("address-list", {"name": "a", "addresses": [{"name": "10.0.0.1/8"}]}),
        ("port-list", {"name": "p", "ports": [{"name": "70000"}]}),
        ("policy", {"name": "x", "rules": [{"name": "r", "action": "allow"}]}),
        ("policy", {"name": "x", "rules": [{"name": "r", "ipProtocol": "tcp", "icmp": [{"name": "8"}]}]}),
        ("policy", {"name": "x", "rules": [{"name": "r", "source": {"addressLists": ["/Common/missing"]}}]}),
        ("policy", {"name": "x", "rules": [{"name": "r", "protocol": "tcp"}]}),
    ]
    for kind, body in bad_bodies:
        with pytest.raises(ICRError):
            execute(cfg, "POST", f"/mgmt/tm/security/firewall/{kind}", body)


# ---- credentials ------------------------------------------------------------------------------


def test_credential_store_round_trip_and_permissions(tmp_path: Path) -> None:
    key = tmp_path / "f5.key"
    create_key_file(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        create_key_file(key)
    store = EncryptedCredentialStore(tmp_path / "creds.json", key)
    store.put("bigip-1", DeviceCredential("admin", "s3cr3t-password"))
    assert store.get("bigip-1") == DeviceCredential("admin", "s3cr3t-password")
    assert "s3cr3t" not in (tmp_path / "creds.json").read_text()
    assert "s3cr3t" not in repr(store.get("bigip-1"))
    assert stat.S_IMODE((tmp_path / "creds.json").stat().st_mode) == 0o600
    assert store.devices() == ("bigip-1",)
    store.delete("bigip-1")
    with pytest.raises(NotFoundError):
        store.get("bigip-1")


def test_credential_store_refuses_loose_key_and_wrong_key(tmp_path: Path) -> None:
    key = tmp_path / "f5.key"
    create_key_file(key)
    store = EncryptedCredentialStore(tmp_path / "creds.json", key)
    store.put("bigip-1", DeviceCredential("admin", "pw"))
    os.chmod(key, 0o644)
    with pytest.raises(AuthError, match="group or others"):
        EncryptedCredentialStore(tmp_path / "creds.json", key)
    other = tmp_path / "other.key"
    create_key_file(other)
    with pytest.raises(AuthError, match="cannot be decrypted"):
        EncryptedCredentialStore(tmp_path / "creds.json", other).get("bigip-1")


def test_backend_uses_stored_credentials(tmp_path: Path) -> None:
    key = tmp_path / "f5.key"
    create_key_file(key)
    store = EncryptedCredentialStore(tmp_path / "creds.json", key)
    store.put("bigip-1", DeviceCredential("admin", "secret"))
    with running_fake_icr() as (dev, url):
        dev.add_virtual(VS)
        backend = F5Backend(url, VS, store.get("bigip-1").as_auth())
        backend.apply(backend.render(inbound("full_basic")))
        backend.close()
        assert dev.config.policies
