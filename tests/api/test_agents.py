"""Pairing profiles, enrolment, the agent protocol (long-poll, fetch full/delta, ack) and convergence."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

from tests.api.conftest import Api

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
    assert idle == {"revision": new_rev, "changed": False, "policy": None}
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
