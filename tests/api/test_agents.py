"""Pairing profiles, enrolment, the agent protocol (long-poll, fetch full/delta, ack) and convergence."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

from fastapi.testclient import TestClient
from tests.api.conftest import Api, make_settings

from stockade.compiler import HostPolicy
from stockade.compiler.delta import UpdateKind, apply_update, policy_update_from_dict
from stockade.controller.app import create_app
from stockade.controller.services.distribution import HISTORY, PolicyDistributor, policy_hash
from stockade.controller.storage.db import AgentRow, HostStateRow

POLICY = [
    ("/services", {"name": "pg", "ports": ["5432/tcp"]}),
    ("/rulesets", {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
         "services": ["pg"]}]}),
]


def profile(api: Api, name: str = "dbs", **kw: Any) -> str:
    body = {"name": name, "labels": {"app": "shop", "role": "db"}, "mode": "full", **kw}
    api.ok("POST", "/pairing-profiles", 201, json=body)
    return str(api.ok("POST", f"/pairing-profiles/{name}/codes", 201)["code"])


def enroll(api: Api, code: str, host: str, addr: str) -> Any:
    return api.client.post("/api/v1/agents/enroll", json={
        "activation_code": code, "hostname": host,
        "interfaces": [{"name": "eth0", "addresses": [addr]}], "agent_version": "test"})


def test_enrol_and_receive_policy(api: Api) -> None:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    api.ok("POST", "/workloads", 201, json={"name": "web-1", "labels": {"app": "shop", "role": "web"},
                                            "interfaces": [{"name": "eth0", "addresses": ["10.0.0.1"]}]})
    code = profile(api)
    r = enroll(api, code, "db-1", "10.0.0.2")
    assert r.status_code == 201, r.text
    agent = r.json()
    token = api.headers(agent["token"])
    aid = agent["agent_id"]
    wl = api.ok("GET", "/workloads/db-1")["body"]
    assert wl["labels"] == {"app": "shop", "role": "db"} and wl["mode"] == "full"

    full = api.ok("GET", f"/agents/{aid}/policy", headers=token)
    rev = full["revision"]
    assert rev >= 1 and full["full"]["workload"] == "db-1"
    inbound = [x for x in full["full"]["rules"] if x["rule_id"].startswith("ruleset/shop")]
    peer = inbound[0]["peer"]
    members = {m for s in full["full"]["sets"] if s["name"] == peer for m in s["members"]}
    assert members == {"10.0.0.1/32"}
    api.ok("POST", f"/agents/{aid}/ack", 204, headers=token, json={"revision": rev})
    conv = api.ok("GET", "/convergence")
    assert conv["agents"] == 1 and conv["converged"] == 1 and conv["lagging"] == []

    # the agent waits; a new web peer arrives; the wait answers at once with a newer revision
    result: dict[str, Any] = {}

    def wait() -> None:
        t0 = time.monotonic()
        result["r"] = api.req("GET", f"/agents/{aid}/policy/wait", headers=token,
                              params={"after": rev, "timeout": 20})
        result["t"] = time.monotonic() - t0

    th = threading.Thread(target=wait)
    th.start()
    time.sleep(0.3)
    api.ok("POST", "/workloads", 201, json={"name": "web-2", "labels": {"app": "shop", "role": "web"},
                                            "interfaces": [{"name": "eth0", "addresses": ["10.0.0.3"]}]})
    th.join(25)
    assert result["r"].status_code == 200 and result["r"].json()["changed"] is True
    assert result["t"] < 5
    new_rev = result["r"].json()["revision"]
    assert new_rev == rev + 1
    assert api.ok("GET", "/convergence")["lagging"] == ["db-1"]

    delta = api.ok("GET", f"/agents/{aid}/policy", headers=token, params={"since": rev})
    assert delta["full"] is None and delta["base"] == rev and delta["revision"] == new_rev
    assert delta["set_deltas"] == [{"name": peer, "family": 4, "added": ["10.0.0.3/32"], "removed": []}]
    api.ok("POST", f"/agents/{aid}/ack", 204, headers=token, json={"revision": new_rev})
    listed = api.ok("GET", "/agents")
    assert listed[0]["converged"] and listed[0]["applied_revision"] == new_rev

    # an unrelated workload does not bump db-1
    api.ok("POST", "/workloads", 201, json={"name": "crm", "labels": {"app": "crm"}})
    assert api.ctl.dist.revisions["db-1"] == new_rev
    # a timed-out wait says unchanged
    idle = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token, params={"after": new_rev, "timeout": 0.2})
    assert idle == {"revision": new_rev, "changed": False, "policy": None, "heartbeat": True, "hold": 120.0}
    # include_policy answers a wait with the fetch result (here: full, since no base revision given)
    inline = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token,
                    params={"after": 0, "timeout": 0, "include_policy": "true"})
    assert inline["changed"] and inline["policy"]["full"]["workload"] == "db-1"
    assert inline["policy"]["revision"] == new_rev

    # report interfaces: peers (web-1) see the new address
    web_before = api.ok("GET", "/workloads/web-1/host-policy")["revision"]
    api.ok("PUT", f"/agents/{aid}/interfaces", headers=token,
           json={"interfaces": [{"name": "eth0", "addresses": ["10.0.0.22"]}]})
    web = api.ok("GET", "/workloads/web-1/host-policy")
    assert web["revision"] == web_before + 1
    assert any("10.0.0.22/32" in s["members"] for s in web["policy"]["sets"])
    hb = api.ok("POST", f"/agents/{aid}/heartbeat", headers=token)
    assert hb["revision"] == api.ctl.dist.revisions["db-1"]
    assert api.ok("GET", f"/agents/{aid}")["status"] == "online"

    # an agent acts only for itself; users may not use agent routes
    assert api.req("GET", "/agents/someoneelse/policy", headers=token).status_code == 403
    assert api.req("GET", f"/agents/{aid}/policy").status_code == 403

    # revoke: the token stops working at once
    api.ok("POST", f"/agents/{aid}/revoke", 204)
    assert api.req("GET", f"/agents/{aid}/policy", headers=token).status_code == 401
    assert api.ok("GET", f"/agents/{aid}")["status"] == "revoked"
    kinds = {e["action"] for e in api.ok("GET", "/events", params={"kind": "agent"})["items"]}
    assert {"agent.enroll", "agent.revoke"} <= kinds


def test_activation_codes_refused_when_expired_used_up_or_revoked(api: Api) -> None:
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    expired = profile(api, "old", expires_at=past)
    r = enroll(api, expired, "h1", "10.1.0.1")
    assert r.status_code == 403 and "expired" in r.text

    once = profile(api, "once", max_uses=1)
    assert enroll(api, once, "h2", "10.1.0.2").status_code == 201
    r = enroll(api, once, "h3", "10.1.0.3")
    assert r.status_code == 403 and "used up" in r.text

    code = profile(api, "rev")
    codes = api.ok("GET", "/events", params={"action": "activation_code.create", "name": "rev"})["items"]
    code_id = codes[0]["after"]["id"]
    api.ok("DELETE", f"/pairing-profiles/rev/codes/{code_id}", 204)
    r = enroll(api, code, "h4", "10.1.0.4")
    assert r.status_code == 403 and "revoked" in r.text

    off = profile(api, "off", enabled=False)
    assert enroll(api, off, "h5", "10.1.0.5").status_code == 403
    assert enroll(api, "act_doesnotexist", "h6", "10.1.0.6").status_code == 403
    # nothing was created by refused enrolments
    names = [o["name"] for o in api.ok("GET", "/workloads")["items"]]
    assert names == ["h2"]
    # a second agent for a workload that has one is a conflict
    multi = profile(api, "multi")
    assert enroll(api, multi, "h2", "10.1.0.2").status_code == 409


def test_profile_validation(api: Api) -> None:
    r = api.req("POST", "/pairing-profiles", json={"name": "p", "labels": {"nokey": "x"}})
    assert r.status_code == 422 and r.json()["issues"][0]["field"] == "labels.nokey"
    r = api.req("POST", "/pairing-profiles", json={"name": "p", "max_uses": 0})
    assert r.status_code == 422
    assert api.req("POST", "/pairing-profiles/none/codes").status_code == 404


def test_wait_can_acknowledge(sqlite_api: Api) -> None:
    api = sqlite_api
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p"})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agent = enroll(api, code, "h", "10.9.0.1").json()
    token = api.headers(agent["token"])
    first = api.ok("GET", f"/agents/{agent['agent_id']}/policy/wait", headers=token,
                   params={"after": 0, "timeout": 0, "include_policy": "true"})
    rev = first["policy"]["revision"]
    assert api.ok("GET", "/convergence")["lagging"] == ["h"]
    api.ok("GET", f"/agents/{agent['agent_id']}/policy/wait", headers=token,
           params={"after": rev, "applied": rev, "timeout": 0})
    assert api.ok("GET", "/convergence")["lagging"] == []


def test_a_long_poll_counts_as_the_agents_heartbeat(api: Api) -> None:
    """One request per agent per poll, not a poll and a heartbeat: the agent is online while it
    polls, on every replica once flushed (issue 18); the answer says so, for the agent to heartbeat less."""
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p"})
    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    agent = enroll(api, code, "h", "10.9.0.1").json()
    aid, token = agent["agent_id"], api.headers(agent["token"])
    assert api.ok("GET", f"/agents/{aid}")["status"] == "offline"  # enrolled, never heard from since
    answer = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token, params={"after": 0, "timeout": 0})
    assert answer["heartbeat"] is True
    shown = api.ok("GET", f"/agents/{aid}")
    assert shown["status"] == "online" and shown["last_heartbeat"] is not None
    assert api.ok("GET", "/convergence")["online"] == 1
    # a poll longer than half of offline_after keeps the promise too: a held poll is presence (test_presence.py);
    # the answer advertises the hold the agent's next poll asks for
    too_long = api.ctl.settings.offline_after / 2 + 1
    long_poll = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token, params={"after": 0, "timeout": too_long})
    assert long_poll["heartbeat"] is True and long_poll["hold"] == api.ctl.settings.long_poll_hold
    api.ctl.dist.flush()
    with api.ctl.session() as db:  # what the other replicas read
        assert db.get(AgentRow, aid).last_heartbeat is not None  # type: ignore[union-attr]


# ---- deltas: from the compiler, composed, bounded history (issue 13 item 3) ------------------------


def _held(api: Api, aid: str, token: dict[str, str]) -> tuple[int, HostPolicy]:
    """What an agent holds after a full fetch: the revision and the decoded policy."""
    upd = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token))
    assert upd.kind is UpdateKind.FULL and upd.policy is not None
    return upd.revision, upd.policy


def _enrolled_db(api: Api) -> tuple[str, dict[str, str]]:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    r = enroll(api, profile(api), "db-1", "10.0.0.2")
    assert r.status_code == 201, r.text
    return r.json()["agent_id"], api.headers(r.json()["token"])


def _web(api: Api, i: int) -> None:
    api.ok("POST", "/workloads", 201, json={"name": f"web-{i}", "labels": {"app": "shop", "role": "web"},
                                            "interfaces": [{"name": "eth0", "addresses": [f"10.0.{i}.1"]}]})


def test_agents_1_3_and_history_plus_1_behind_converge(api: Api) -> None:
    aid, token = _enrolled_db(api)
    held = dict([_held(api, aid, token)])
    for i in range(1, HISTORY + 2):
        _web(api, i)  # one new peer: db-1 moves one revision, a set delta from the compiler
        rev, hp = _held(api, aid, token)
        assert rev == max(held) + 1
        held[rev] = hp
    current = max(held)
    for behind, kind in ((1, UpdateKind.DELTA), (3, UpdateKind.DELTA), (HISTORY + 1, UpdateKind.FULL)):
        since = current - behind
        upd = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token, params={"since": since}))
        assert upd.kind is kind and upd.revision == current, behind
        if kind is UpdateKind.DELTA:
            assert upd.base == since
            (d,) = upd.set_deltas  # the new web addresses, composed into one delta of one set
            assert len(d.added) == behind and not d.removed
        assert apply_update(held[since], since, upd) == held[current]
    # the same through the long-poll's inline answer
    inline = api.ok("GET", f"/agents/{aid}/policy/wait", headers=token,
                    params={"after": current - 3, "timeout": 0, "include_policy": "true"})
    upd = policy_update_from_dict(inline["policy"])
    assert upd.kind is UpdateKind.DELTA and apply_update(held[current - 3], current - 3, upd) == held[current]
    assert inline["policy"] == api.ok("GET", f"/agents/{aid}/policy", headers=token, params={"since": current - 3})
    assert inline["revision"] == current and inline["changed"] is True and inline["heartbeat"] is True
    assert inline["hold"] == api.ctl.settings.long_poll_hold
    # a rules change (db-1 relabelled) cannot be a delta: every older revision gets the full policy
    body = api.ok("GET", "/workloads/db-1")["body"]
    api.ok("PUT", "/workloads/db-1", json={**body, "labels": {"app": "shop", "role": "web"}})
    upd = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token, params={"since": current}))
    assert upd.kind is UpdateKind.FULL and upd.revision == current + 1


def test_one_transaction_with_several_changes_is_one_composed_delta(api: Api) -> None:
    aid, token = _enrolled_db(api)
    rev, old = _held(api, aid, token)
    docs = [
        "apiVersion: stockade.io/v1\nkind: Workload\n"
        f"name: web-{i}\nlabels: {{app: shop, role: web}}\ninterfaces: [{{name: eth0, addresses: [10.0.1.{i}]}}]\n"
        for i in (2, 3, 5)
    ]
    # the import replaces the draft's policy: export it and append the workloads, so the import
    # changes only the inventory (one transaction, three workloads)
    exported = api.req("GET", "/policy/draft")
    assert exported.status_code == 200, exported.text
    api.ok("PUT", "/policy/draft", content="---\n".join([exported.text.rstrip("\n") + "\n", *docs]),
           headers={**api.owner, "Content-Type": "application/yaml"})
    upd = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token, params={"since": rev}))
    assert upd.kind is UpdateKind.DELTA and upd.revision == rev + 1  # one import, one revision
    (d,) = upd.set_deltas
    # .2 came as a /32, then .3 merged it into a /31: the composition sends only the net CIDRs
    assert [str(n) for n in d.added] == ["10.0.1.2/31", "10.0.1.5/32"] and d.removed == ()
    assert apply_update(old, rev, upd) == _held(api, aid, token)[1]


def test_policy_hashes_are_written_by_flush_and_survive_a_restart(database_url: str) -> None:
    # no background flush during the test (every 2 s by default: under load it hashed the bump
    # before the first check); the test calls flush() itself
    app = create_app(make_settings(database_url, flush_interval=3600.0))
    with TestClient(app) as client:
        _hashes_follow_flush(Api(client, app.state.controller))


def _hashes_follow_flush(api: Api) -> None:
    _enrolled_db(api)
    _web(api, 1)
    dist = api.ctl.dist
    rev = dist.revisions["db-1"]
    with dist.sessions.begin() as db:
        assert db.get(HostStateRow, "db-1").policy_hash == ""  # a bump hashes nothing
    dist.flush()
    with dist.sessions.begin() as db:
        assert db.get(HostStateRow, "db-1").policy_hash == policy_hash(dist.history["db-1"].policy)
    again = PolicyDistributor(dist.sessions)
    again.load()
    assert again.revisions["db-1"] == rev  # hashed: a restart keeps the revision
    _web(api, 2)  # bumped, not flushed: a restart cannot tell, so it bumps (the agent reloads)
    again = PolicyDistributor(dist.sessions)
    again.load()
    assert again.revisions["db-1"] == rev + 2


def test_agent_state_a_failed_flush_did_not_write_is_written_by_the_next(database_url: str) -> None:
    """An ack whose flush failed (SQLite's "database is locked" under a burst of writes) stays
    dirty: the next flush writes it, instead of it being lost until the agent's next ack."""
    from sqlalchemy.exc import OperationalError

    from stockade.controller.storage.db import AgentRow

    app = create_app(make_settings(database_url, flush_interval=3600.0))
    with TestClient(app) as client:
        api = Api(client, app.state.controller)
        aid, token = _enrolled_db(api)
        dist = api.ctl.dist
        dist.flush()  # the policy hashes written: the failing flush below fails on the agents' rows
        rev = dist.revisions["db-1"]
        api.ok("POST", f"/agents/{aid}/ack", 204, headers=token, json={"revision": rev})
        real_begin = dist.sessions.begin

        def locked() -> Any:
            raise OperationalError("UPDATE agents", {}, Exception("database is locked"))

        dist.sessions.begin = locked  # type: ignore[method-assign]
        try:
            try:
                dist.flush()
            except OperationalError:
                pass
            else:
                raise AssertionError("the flush did not reach the database")
        finally:
            dist.sessions.begin = real_begin  # type: ignore[method-assign]
        assert dist.flush() >= 1
        with dist.sessions.begin() as db:
            assert db.get(AgentRow, aid).applied_revision == rev
