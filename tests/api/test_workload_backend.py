"""A workload's ``backend`` setting through the REST API (SQLite and PostgreSQL): validated by the
one codec (422 naming the field), refused when the workload's agent reported it lacks that
backend, authorised by role and scope, audited, delivered with the host's compiled policy, and
the backend in force shown per agent from its heartbeat; migration 0012 turns the stored old
default into null."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from tests.api.conftest import Api
from tests.api.test_agents import POLICY, enroll, profile

from stockade.compiler.delta import policy_update_from_dict
from stockade.controller.storage.db import MIGRATIONS_DIR, make_engine, migrate


def _setup(api: Api) -> tuple[str, dict[str, str]]:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    api.ok("POST", "/workloads", 201, json={"name": "web-1", "labels": {"app": "shop", "role": "web"},
                                            "interfaces": [{"name": "eth0", "addresses": ["10.0.0.1"]}]})
    r = enroll(api, profile(api), "db-1", "10.0.0.2")
    assert r.status_code == 201, r.text
    return r.json()["agent_id"], api.headers(r.json()["token"])


def _put_backend(api: Api, name: str, backend: Any, headers: dict[str, str] | None = None) -> Any:
    body = api.ok("GET", f"/workloads/{name}")["body"]
    return api.req("PUT", f"/workloads/{name}", json={**body, "backend": backend}, headers=headers or api.owner)


def _fetch(api: Api, aid: str, token: dict[str, str]) -> Any:
    upd = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token))
    assert upd.policy is not None
    return upd


def test_the_setting_reaches_the_agent_with_the_same_rules_and_is_audited(api: Api) -> None:
    aid, token = _setup(api)
    assert api.ok("GET", "/workloads/db-1")["body"]["backend"] is None  # the agent's own choice
    before = _fetch(api, aid, token)
    assert before.policy.backend is None
    r = _put_backend(api, "db-1", "iptables")
    assert r.status_code == 200, r.text
    after = _fetch(api, aid, token)
    assert after.revision > before.revision and after.policy.backend == "iptables"
    assert after.policy.rules == before.policy.rules and after.policy.sets == before.policy.sets  # never wider
    update = next(e for e in api.ok("GET", "/events", params={"name": "db-1"})["items"]
                  if e["action"] == "workload.update" and (e["after"] or {}).get("backend") == "iptables")
    assert (update["before"] or {}).get("backend") is None
    # null again: back to the agent's own --backend, and the wire has no backend field
    assert _put_backend(api, "db-1", None).status_code == 200
    assert "backend" not in api.ok("GET", f"/agents/{aid}/policy", headers=token)["full"]


def test_an_unknown_backend_is_a_422_naming_the_field(api: Api) -> None:
    _setup(api)
    for bad in ("pf", "NFTABLES", 7, ["nftables"], "ebpf; reboot"):
        r = _put_backend(api, "db-1", bad)
        assert r.status_code == 422, (bad, r.text)
        assert "backend" in r.text, r.text
    r = api.req("POST", "/workloads", json={"name": "w-2", "backend": "pf"})
    assert r.status_code == 422 and "backend" in r.text
    assert api.ok("GET", "/workloads/db-1")["body"]["backend"] is None


def test_a_backend_the_agent_reported_it_lacks_is_refused(api: Api) -> None:
    aid, token = _setup(api)
    beat = {"applied_revision": 1, "mode": "full", "tamper_count": 0, "backend": "nftables",
            "backends": ["iptables", "nftables"]}
    api.ok("POST", f"/agents/{aid}/heartbeat", json=beat, headers=token)
    agent = api.ok("GET", f"/agents/{aid}")
    assert agent["backend"] == "nftables" and agent["backends"] == ["iptables", "nftables"]
    r = _put_backend(api, "db-1", "ebpf")
    assert r.status_code == 422, r.text
    assert "backend" in r.text and "cannot enforce" in r.text
    assert api.ok("GET", "/workloads/db-1")["body"]["backend"] is None  # nothing written
    assert _put_backend(api, "db-1", "iptables").status_code == 200
    # the agent says it switched: the console/API show the backend in force
    api.ok("POST", f"/agents/{aid}/heartbeat", json={**beat, "backend": "iptables"}, headers=token)
    assert api.ok("GET", "/agents", params={"workload": "db-1"})[0]["backend"] == "iptables"
    # an older agent's empty heartbeat changes nothing
    api.ok("POST", f"/agents/{aid}/heartbeat", json={}, headers=token)
    assert api.ok("GET", f"/agents/{aid}")["backend"] == "iptables"


def test_a_bad_heartbeat_is_a_422(api: Api) -> None:
    aid, token = _setup(api)
    for bad in ({"backend": "a b"}, {"backends": ["x" * 40]}, {"backend": 3}):
        r = api.req("POST", f"/agents/{aid}/heartbeat", json=bad, headers=token)
        assert r.status_code == 422, (bad, r.text)


def test_authorised_by_role_and_scope(api: Api) -> None:
    _setup(api)
    api.ok("POST", "/workloads", 201, json={"name": "bill-1", "labels": {"app": "billing", "role": "db"}})
    for role, scope in (("read-only", None), ("ruleset-manager", ["app=shop"])):
        r = _put_backend(api, "db-1", "iptables", api.key(role, scope))
        assert r.status_code == 403, (role, r.text)
    scoped = api.key("admin", ["app=shop"])
    r = _put_backend(api, "bill-1", "iptables", scoped)
    assert r.status_code == 403, r.text
    assert api.ok("GET", "/workloads/bill-1")["body"]["backend"] is None
    assert _put_backend(api, "db-1", "iptables", scoped).status_code == 200
    assert api.ok("GET", "/workloads/db-1")["body"]["backend"] == "iptables"


# ---- 0012_workload_backend: the stored old default becomes null ----------------------------------


def test_the_migration_turns_the_stored_old_default_into_the_agent_s_choice(database_url: str) -> None:
    """Every workload stored before carries "backend": "nftables" (the old schema default, never acted
    on); upgraded, it is null (the agent's own --backend), so no agent is switched by the upgrade.
    A backend set to something else is kept."""
    engine = make_engine(database_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0010_wireguard")
        now = dt.datetime.now(dt.UTC)
        bodies = {"old": {"name": "old", "mode": "full", "backend": "nftables"},
                  "chosen": {"name": "chosen", "mode": "full", "backend": "iptables"}}
        with engine.begin() as conn:
            for name, body in bodies.items():
                conn.execute(sa.text("INSERT INTO objects (kind, name, body, revision, created_at, updated_at) "
                                     "VALUES ('workload', :n, :b, 3, :t, :t)"),
                             {"n": name, "b": json.dumps(body), "t": now})
        migrate(engine)
        migrate(engine)  # idempotent
        with engine.connect() as conn:
            rows = {n: (json.loads(b) if isinstance(b, str) else b, r) for n, b, r in conn.execute(
                sa.text("SELECT name, body, revision FROM objects WHERE kind = 'workload'"))}
        assert rows["old"] == ({**bodies["old"], "backend": None}, 4)
        assert rows["chosen"] == (bodies["chosen"], 3)
    finally:
        engine.dispose()
