"""WireGuard keys through the API: registration by the agent, distribution to the peers of
encrypted rules only, refusals (4xx naming the field, and an event), operator revocation."""

from __future__ import annotations

import base64
import os
from typing import Any

from tests.api.conftest import Api
from tests.api.test_agents import enroll

POLICY = [
    ("/services", {"name": "pg", "ports": ["5432/tcp"]}),
    ("/services", {"name": "http", "ports": ["80/tcp"]}),
    ("/rulesets", {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
         "services": ["pg"], "encrypt": True},
        {"consumers": [{"labels": {"role": "lb"}}], "providers": [{"labels": {"role": "web"}}],
         "services": ["http"]}]}),
]


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def agent(api: Api, role: str, addr: str) -> tuple[str, dict[str, str]]:
    api.ok("POST", "/pairing-profiles", 201, json={"name": role, "labels": {"app": "shop", "role": role},
                                                   "mode": "full"})
    code = api.ok("POST", f"/pairing-profiles/{role}/codes", 201)["code"]
    r = enroll(api, code, f"{role}-1", addr)
    assert r.status_code == 201, r.text
    return r.json()["agent_id"], api.headers(r.json()["token"])


def full_policy(api: Api, aid: str, headers: dict[str, str]) -> Any:
    return api.ok("GET", f"/agents/{aid}/policy", headers=headers)["full"]


def refusals(api: Api) -> list[Any]:
    return list(api.ok("GET", "/events", params={"action": "wireguard.key_refused"})["items"])


def test_register_distribute_refuse_revoke(api: Api) -> None:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    # the YAML/REST codec keeps encrypt: true
    assert api.ok("GET", "/rulesets/shop")["body"]["rules"][0]["encrypt"] is True
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    web, web_h = agent(api, "web", "10.0.0.1")
    db, db_h = agent(api, "db", "10.0.0.2")
    lb, lb_h = agent(api, "lb", "10.0.0.3")
    web_key, db_key = new_key(), new_key()

    # before any key: db has an encrypted rule but no peer yet (its traffic is dropped, never clear)
    db_policy = full_policy(api, db, db_h)
    assert any(r.get("encrypt") for r in db_policy["rules"])
    assert db_policy["wireguard"]["peers"] == []

    api.ok("PUT", f"/agents/{web}/wireguard-key", 204, headers=web_h,
           json={"public_key": web_key, "endpoint": "10.0.0.1", "port": 51820})
    api.ok("PUT", f"/agents/{db}/wireguard-key", 204, headers=db_h, json={"public_key": db_key})
    db_policy = full_policy(api, db, db_h)
    assert db_policy["wireguard"]["peers"] == [{"workload": "web-1", "public_key": web_key,
                                                "endpoint": "10.0.0.1", "port": 51820,
                                                "allowed": ["10.0.0.1/32"]}]
    assert [p["public_key"] for p in full_policy(api, web, web_h)["wireguard"]["peers"]] == [db_key]
    # only hosts that need it: lb talks to web in the clear, it gets no tunnel and no keys
    assert "wireguard" not in full_policy(api, lb, lb_h)
    events = api.ok("GET", "/events", params={"action": "wireguard.key_register"})["items"]
    assert {e["name"] for e in events} == {"web-1", "db-1"}

    # refusals: 4xx naming the field, an event each, nothing changed
    before = len(refusals(api))
    r = api.req("PUT", f"/agents/{lb}/wireguard-key", headers=lb_h, json={"public_key": "not-a-key"})
    assert r.status_code == 422 and "public_key" in r.text
    r = api.req("PUT", f"/agents/{lb}/wireguard-key", headers=lb_h, json={"public_key": web_key})
    assert r.status_code == 409 and "another workload" in r.text
    r = api.req("PUT", f"/agents/{lb}/wireguard-key", headers=lb_h,
                json={"public_key": new_key(), "endpoint": "10.0.0.1"})
    assert r.status_code == 422 and "endpoint" in r.text
    assert len(refusals(api)) == before + 3
    # an agent acts only for itself
    assert api.req("PUT", f"/agents/{web}/wireguard-key", headers=lb_h,
                   json={"public_key": new_key()}).status_code == 403

    # rotation: the peer sees the new key, as a peer delta from the revision it holds (not a full update)
    held = api.ok("GET", f"/agents/{db}/policy", headers=db_h)["revision"]
    rotated = new_key()
    api.ok("PUT", f"/agents/{web}/wireguard-key", 204, headers=web_h, json={"public_key": rotated})
    update = api.ok("GET", f"/agents/{db}/policy", headers=db_h, params={"since": held})
    assert update["full"] is None and update["base"] == held and update["revision"] > held
    assert update["set_deltas"] == [] and update["peers"]["removed"] == []
    assert [(p["workload"], p["public_key"]) for p in update["peers"]["set"]] == [("web-1", rotated)]
    assert [p["public_key"] for p in full_policy(api, db, db_h)["wireguard"]["peers"]] == [rotated]

    # revocation: operators only; the peer loses the key
    ro = api.key("read-only")
    assert api.req("DELETE", "/workloads/web-1/wireguard-key", headers=ro).status_code == 403
    api.ok("DELETE", "/workloads/web-1/wireguard-key", 204)
    assert full_policy(api, db, db_h)["wireguard"]["peers"] == []
    assert api.req("DELETE", "/workloads/web-1/wireguard-key").status_code == 404
    assert api.ok("GET", "/events", params={"action": "wireguard.key_revoke"})["items"][0]["name"] == "web-1"
