"""Enrolment abuse (issue 12 item 2): every way to enrol gives its documented result, on SQLite and PostgreSQL.

The class: an activation code must never let its holder take over an identity an admin did not
hand out. Each row of the matrix below is one way to enrol; the attacker tests then play the
reported attack (a monitoring-profile code used against the prod database) end to end and check
that nothing of the database's labels, addresses or policy reaches the attacker.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import update

from stockade.controller.storage.db import MIGRATIONS_DIR, ActivationCodeRow, UTCDateTime, make_engine, migrate
from tests.api.conftest import Api

DB_ADDR = "10.9.0.5"
PROD = {"app": "shop", "env": "prod", "role": "db"}


def setup_estate(api: Api) -> None:
    """db-prod-1 (declared by an admin, no agent yet) and a policy that lets only web reach it."""
    api.ok("POST", "/workloads", 201, json={"name": "db-prod-1", "labels": PROD, "mode": "full",
                                            "interfaces": [{"name": "eth0", "addresses": [DB_ADDR]}]})
    api.ok("POST", "/services", 201, json={"name": "pg", "ports": ["5432/tcp"]})
    api.ok("POST", "/rulesets", 201, json={"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}], "services": ["pg"]}]})
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    api.ok("POST", "/pairing-profiles", 201, json={"name": "monitoring", "mode": "visibility",
                                                   "labels": {"app": "ops", "role": "monitoring"}})


def code(api: Api, profile: str = "monitoring", **body: Any) -> str:
    return str(api.ok("POST", f"/pairing-profiles/{profile}/codes", 201, json=body)["code"])


def enroll(api: Api, activation_code: str, hostname: str, addresses: tuple[str, ...] = ()) -> Any:
    return api.client.post("/api/v1/agents/enroll", json={
        "activation_code": activation_code, "hostname": hostname,
        "interfaces": [{"name": "eth0", "addresses": list(addresses)}] if addresses else []})


def workload(api: Api, name: str) -> dict[str, Any]:
    body: dict[str, Any] = api.ok("GET", f"/workloads/{name}")["body"]
    return body


def agents_of(api: Api, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = api.ok("GET", "/agents", params={"workload": name})
    return found


def revoke_all(api: Api, name: str) -> None:
    for a in agents_of(api, name):
        api.ok("POST", f"/agents/{a['id']}/revoke", 204)


def expire(api: Api, code_id: str) -> None:
    with api.ctl.sessions.begin() as db:
        db.execute(update(ActivationCodeRow).where(ActivationCodeRow.id == code_id)
                   .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))


def test_codes_default_to_single_use_with_a_one_day_expiry(api: Api) -> None:
    setup_estate(api)
    prof = api.ok("GET", "/pairing-profiles/monitoring")
    assert (prof["code_max_uses"], prof["code_ttl_seconds"]) == (1, 86400)
    issued = api.ok("POST", "/pairing-profiles/monitoring/codes", 201)
    assert issued["max_uses"] == 1 and issued["workload"] is None
    left = dt.datetime.fromisoformat(issued["expires_at"]) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23) < left <= dt.timedelta(days=1)
    assert enroll(api, issued["code"], "mon-1").status_code == 201
    again = enroll(api, issued["code"], "mon-2")
    assert again.status_code == 403 and "used up" in again.json()["message"]
    listed = api.ok("GET", "/pairing-profiles/monitoring/codes")
    assert [(c["id"], c["uses"], c["max_uses"]) for c in listed] == [(issued["id"], 1, 1)]
    assert "code" not in listed[0]  # the code itself is never shown again


def test_more_uses_or_a_longer_life_only_when_the_profile_says_so(api: Api) -> None:
    setup_estate(api)
    r = api.req("POST", "/pairing-profiles/monitoring/codes", json={"max_uses": 5, "ttl_seconds": 7 * 86400})
    assert r.status_code == 422
    assert {i["field"] for i in r.json()["issues"]} == {"max_uses", "ttl_seconds"}
    prof = api.ok("GET", "/pairing-profiles/monitoring")
    body = {k: prof[k] for k in ("name", "labels", "mode", "expires_at", "max_uses", "enabled", "description")}
    api.ok("PUT", "/pairing-profiles/monitoring", json={**body, "code_max_uses": 3, "code_ttl_seconds": 7 * 86400},
           headers={**api.owner, "If-Match": prof["etag"]})
    fleet = code(api)  # the profile's own settings: 3 uses, 7 days
    assert [enroll(api, fleet, f"mon-{i}").status_code for i in range(4)] == [201, 201, 201, 403]
    short = api.ok("POST", "/pairing-profiles/monitoring/codes", 201, json={"max_uses": 2, "ttl_seconds": 60})
    assert short["max_uses"] == 2
    assert dt.datetime.fromisoformat(short["expires_at"]) - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=60)
    adoption = api.req("POST", "/pairing-profiles/monitoring/codes", json={"workload": "db-prod-1", "max_uses": 2})
    assert adoption.status_code == 422 and "single use" in adoption.text


# (case, expected status, message fragment). "profile" codes create; "adopt" codes are bound to the workload.
MATRIX = [
    ("new name, profile code", 201, ""),
    ("agent-less workload, profile code", 409, "adoption code"),
    ("agent-less workload, adoption code", 201, ""),
    ("workload with a live agent, profile code", 409, "already"),
    ("workload with a live agent, adoption code", 409, "revoke it first"),
    ("revoked agent's workload, profile code", 409, "adoption code"),
    ("revoked agent's workload, adoption code", 201, ""),
    ("expired code", 403, "expired"),
    ("used single-use code", 403, "used up"),
    ("used adoption code", 403, "used up"),
    ("revoked code", 403, "revoked"),
    ("adoption code for a name not yet declared", 201, ""),
]


@pytest.mark.parametrize(("case", "status", "fragment"), MATRIX, ids=[m[0] for m in MATRIX])
def test_every_way_to_enrol(api: Api, case: str, status: int, fragment: str) -> None:
    setup_estate(api)
    target = "db-prod-1"
    if "live agent" in case or "revoked agent" in case:
        assert enroll(api, code(api, workload=target), "whatever", (DB_ADDR,)).status_code == 201
        if "revoked" in case:
            revoke_all(api, target)
    before = workload(api, target)
    agents_before = len(agents_of(api, target))
    if case == "new name, profile code":
        target = "mon-new"
        r = enroll(api, code(api), target, ("10.9.0.50",))
    elif case == "expired code":
        issued = api.ok("POST", "/pairing-profiles/monitoring/codes", 201)
        expire(api, issued["id"])
        r = enroll(api, issued["code"], "mon-late")
    elif case.startswith("used"):
        c = code(api, workload=target) if "adoption" in case else code(api)
        first = enroll(api, c, "mon-first")
        assert first.status_code == 201, first.text
        if "adoption" in case:
            revoke_all(api, target)
        before, agents_before = workload(api, target), len(agents_of(api, target))
        r = enroll(api, c, "mon-second")
    elif case == "revoked code":
        issued = api.ok("POST", "/pairing-profiles/monitoring/codes", 201)
        api.ok("DELETE", f"/pairing-profiles/monitoring/codes/{issued['id']}", 204)
        r = enroll(api, issued["code"], "mon-revoked")
    elif case == "adoption code for a name not yet declared":
        target = "mon-reserved"
        r = enroll(api, code(api, workload=target), "some-hostname")
    else:
        bound = code(api, workload=target) if "adoption code" in case else code(api)
        r = enroll(api, bound, target, ("10.9.0.66",))
    assert r.status_code == status, r.text
    assert fragment in r.json().get("message", ""), r.text
    if status != 201:
        if target == "db-prod-1":  # refused: the workload and its agents are as they were
            assert workload(api, target) == before
            assert len(agents_of(api, target)) == agents_before
        return
    out = r.json()
    assert out["workload"] == target
    got = workload(api, target)
    if target == "db-prod-1":  # adopted: the admin's labels and mode stay; the host's report is taken
        assert got["labels"] == PROD and got["mode"] == "full"
        assert got["interfaces"][0]["addresses"] == ["10.9.0.66"]
    else:  # created: labels and mode from the pairing profile
        assert got["labels"] == {"app": "ops", "role": "monitoring"} and got["mode"] == "visibility"
    enrolled = [e for e in api.ok("GET", "/events", params={"action": "agent.enroll"})["items"]
                if e["after"]["workload"] == target]
    assert enrolled and enrolled[0]["after"]["adopted"] == (target == "db-prod-1")


def test_a_refused_enrolment_does_not_use_the_code(api: Api) -> None:
    setup_estate(api)
    c = code(api)
    assert enroll(api, c, "db-prod-1").status_code == 409
    assert enroll(api, c, "mon-1").status_code == 201


def test_a_monitoring_code_gets_nothing_of_the_prod_database(api: Api) -> None:
    """The reported attack: with a monitoring-profile code, enrol as db-prod-1, or as a new name
    claiming db-prod-1's address. Neither yields its labels, its address or its policy."""
    setup_estate(api)
    db_policy = api.ok("GET", "/workloads/db-prod-1/host-policy")
    r = enroll(api, code(api), "db-prod-1", ("203.0.113.66",))
    assert r.status_code == 409
    assert "shop" not in r.text and DB_ADDR not in r.text and "token" not in r.json()  # no labels, no address
    assert workload(api, "db-prod-1")["interfaces"][0]["addresses"] == [DB_ADDR]

    r = enroll(api, code(api), "mon-evil", (DB_ADDR, "10.9.0.77"))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["quarantined"] is True and "db-prod-1" not in r.text
    token = api.headers(out["token"])
    assert workload(api, "db-prod-1")["interfaces"][0]["addresses"] == [DB_ADDR]  # not moved
    assert workload(api, "mon-evil")["labels"] == {"app": "ops", "role": "monitoring"}
    assert workload(api, "mon-evil")["interfaces"][0]["addresses"] == ["10.9.0.77"]
    mine = api.req("GET", f"/agents/{out['agent_id']}/policy", headers=token)
    assert mine.status_code == 200 and mine.json()["full"]["workload"] == "mon-evil"
    assert DB_ADDR not in mine.text and "5432" not in mine.text
    # the agent's own later report of the address is held back too, and answers nothing about the owner
    rep = api.req("PUT", f"/agents/{out['agent_id']}/interfaces", headers=token,
                  json={"interfaces": [{"name": "eth0", "addresses": [DB_ADDR]}]})
    assert rep.status_code == 200 and rep.json()["quarantined"] is True and "db-prod-1" not in rep.text
    assert workload(api, "db-prod-1")["interfaces"][0]["addresses"] == [DB_ADDR]
    # other agents' routes stay closed to it
    assert api.req("GET", "/workloads/db-prod-1/host-policy", headers=token).status_code == 403
    assert api.ok("GET", "/workloads/db-prod-1/host-policy")["policy"] == db_policy["policy"]
    # the admin sees who collided with whom
    events = api.ok("GET", "/events", params={"action": "agent.quarantine"})["items"]
    assert events and events[0]["after"]["owners"] == ["db-prod-1"] and events[0]["after"]["addresses"] == [DB_ADDR]
    listed = api.ok("GET", f"/agents/{out['agent_id']}")
    assert listed["quarantined"] and "another workload" in listed["quarantine_reason"]


def test_quarantine_holds_reports_until_an_admin_clears_it(api: Api) -> None:
    setup_estate(api)
    out = enroll(api, code(api), "mon-1", (DB_ADDR,)).json()
    aid, token = out["agent_id"], api.headers(out["token"])
    # a report that no longer collides is still held while quarantined
    api.ok("PUT", f"/agents/{aid}/interfaces", headers=token,
           json={"interfaces": [{"name": "eth0", "addresses": ["10.9.0.80"]}]})
    assert workload(api, "mon-1")["interfaces"][0]["addresses"] == []
    assert api.req("POST", f"/agents/{aid}/quarantine/clear", headers=api.key("read-only")).status_code == 403
    api.ok("POST", f"/agents/{aid}/quarantine/clear", 204)
    assert workload(api, "mon-1")["interfaces"][0]["addresses"] == ["10.9.0.80"]  # the held report applied
    assert not api.ok("GET", f"/agents/{aid}")["quarantined"]
    assert api.ok("GET", "/events", params={"action": "agent.quarantine_clear"})["items"]
    # a held report that still collides keeps the quarantine; the admin is told with whom
    api.ok("PUT", f"/agents/{aid}/interfaces", headers=token,
           json={"interfaces": [{"name": "eth0", "addresses": [DB_ADDR]}]})
    r = api.req("POST", f"/agents/{aid}/quarantine/clear")
    assert r.status_code == 409 and "db-prod-1" in r.text
    assert api.ok("GET", f"/agents/{aid}")["quarantined"]


def test_migration_0008_on_an_existing_database(database_url: str) -> None:
    """Codes issued before 0008 were unlimited: they keep working but expire a week after the upgrade;
    agents enrolled before keep their token (no key yet); the downgrade drops the new columns."""
    engine = make_engine(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0007_flows_port_verdict_index")
        now = dt.datetime.now(dt.UTC)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO pairing_profiles (name, labels, mode, uses, enabled, description, "
                                 "revision, created_at) VALUES ('old', '{}', 'visibility', 3, true, '', 1, :t)"),
                         {"t": now})
            conn.execute(sa.text("INSERT INTO activation_codes (id, code_hash, profile, created_at, revoked) "
                                 "VALUES ('c1', 'h', 'old', :t, false)"), {"t": now})
            conn.execute(sa.text("INSERT INTO agents (id, workload, token_hash, profile, hostname, created_at, "
                                 "applied_revision, agent_version) VALUES ('a1', 'w', 't', 'old', 'w', :t, 0, '')"),
                         {"t": now})
        with engine.begin() as conn:  # 0011 moves the profiles into objects: test_pairing_profile_migration.py
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0010_wireguard")
        with engine.connect() as conn:
            code_row = conn.execute(sa.text("SELECT max_uses, uses, expires_at, workload FROM activation_codes")).one()
            assert code_row[0] is None and code_row[1] == 0 and code_row[3] is None
            # read as the app reads it (UTC on both databases)
            expires = conn.execute(sa.select(sa.column("expires_at", UTCDateTime())).select_from(
                sa.table("activation_codes"))).scalar_one()
            assert expires is not None and dt.timedelta(days=6) < expires - now <= dt.timedelta(days=7, minutes=5)
        with engine.connect() as conn:
            prof = conn.execute(sa.text("SELECT code_max_uses, code_ttl_seconds FROM pairing_profiles")).one()
            assert tuple(prof) == (1, 86400)
            agent = conn.execute(sa.text("SELECT public_key, quarantined_at FROM agents")).one()
            assert tuple(agent) == (None, None)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0007_flows_port_verdict_index")
        columns = {c["name"] for c in sa.inspect(engine).get_columns("agents")}
        assert "public_key" not in columns and "quarantine_reason" not in columns
        migrate(engine)
    finally:
        engine.dispose()
