"""The node protocol (issue 15): one long-poll, one ack batch and one batch enrolment per node.

On SQLite and PostgreSQL (the ``api`` fixture). The class: a node credential polls, acknowledges
and enrols only the pod identities bound to *its* node (another node's pod, a host's agent, an
unknown id: 403 for the whole request); each moved pod's answer is exactly what that pod's own
``GET /policy?since=`` returns (set deltas stay set deltas); every pod keeps its own revision and
acknowledgement; the node's requests are its pods' heartbeats; a revoked or deleted pod is ``gone``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from stockade.agent.signing import AgentAuth
from stockade.agent.state import Credential, StateDir
from stockade.agent_signature import public_key_text
from tests.api.conftest import Api
from tests.security.test_pod_enrolment import _agent

POLICY = [
    ("/services", {"name": "pg", "ports": ["5432/tcp"]}),
    ("/rulesets", {"name": "shop", "scope": [{"labels": {"app": "shop"}}], "rules": [
        {"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
         "services": ["pg"]}]}),
]


def _pod(name: str, node: str, role: str, addr: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app": "shop", "role": role, "k8s-node": node}, "mode": "full",
            "interfaces": [{"name": "eth0", "addresses": [addr]}]}


def _estate(api: Api) -> None:
    api.ok("POST", "/label-keys", 201, json={"name": "k8s-node", "values": []})
    api.ok("POST", "/pairing-profiles", 201, json={"name": "k8s-nodes", "mode": "idle", "code_max_uses": 5})
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    for body in (_pod("k8s.shop.db-1", "node-a", "db", "10.60.0.1"), _pod("k8s.shop.db-2", "node-a", "db", "10.60.0.2"),
                 _pod("k8s.shop.db-3", "node-b", "db", "10.60.0.3"), _pod("k8s.shop.web-1", "node-b", "web",
                                                                          "10.60.0.4")):
        api.ok("POST", "/workloads", 201, json=body)


def _batch(api: Api, node: Credential, pods: list[str], tmp: Path, include_policy: bool = False) -> Any:
    items = [{"workload": p, "public_key": public_key_text(StateDir(tmp / f"pod-{p}").load_or_create_key())}
             for p in pods]
    r = api.client.post(f"/api/v1/agents/{node.agent_id}/pods/enroll-batch", auth=AgentAuth(node),
                        json={"pods": items, "include_policy": include_policy})
    assert r.status_code == 200, r.text
    return r.json()


def _poll(api: Api, node: Credential, held: dict[str, int], timeout: float = 0, acks: dict[str, int] | None = None,
          as_id: str | None = None) -> Any:
    body = {"pods": [{"agent_id": a, "revision": r} for a, r in held.items()], "timeout": timeout,
            "acks": [{"agent_id": a, "revision": r} for a, r in (acks or {}).items()]}
    return api.client.post(f"/api/v1/agents/{as_id or node.agent_id}/pods/updates", json=body, auth=AgentAuth(node))


def test_batch_enrolment_authorises_and_audits_every_pod(api: Api, tmp_path: Path) -> None:
    _estate(api)
    node_a = _agent(api, tmp_path, "node-a")
    got = _batch(api, node_a, ["k8s.shop.db-1", "k8s.shop.db-3", "k8s.shop.missing", "k8s.shop.db-2"], tmp_path,
                 include_policy=True)
    assert sorted(e["workload"] for e in got["enrolled"]) == ["k8s.shop.db-1", "k8s.shop.db-2"]
    assert {e["workload"]: e["policy"]["full"]["workload"] for e in got["enrolled"]} == {
        "k8s.shop.db-1": "k8s.shop.db-1", "k8s.shop.db-2": "k8s.shop.db-2"}  # each pod its own policy
    refused = {r["workload"]: (r["status"], r["message"]) for r in got["refused"]}
    assert refused["k8s.shop.db-3"][0] == 403 and "not bound to node 'node-a'" in refused["k8s.shop.db-3"][1]
    assert refused["k8s.shop.missing"][0] == 404
    assert "full" not in str(got["refused"])  # nothing of another node's pod leaks
    events = api.ok("GET", "/events", params={"action": "agent.enroll", "limit": "50"})
    items = events["items"] if isinstance(events, dict) else events
    mine = [e for e in items if e["actor"] == f"agent:{node_a.agent_id}"]
    assert sorted(e["after"]["workload"] for e in mine) == ["k8s.shop.db-1", "k8s.shop.db-2"]
    # not a pod workload, and a bad key: refused per pod; a batch in another agent's name: refused whole
    key = public_key_text(StateDir(tmp_path / "k").load_or_create_key())
    r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/enroll-batch", auth=AgentAuth(node_a),
                        json={"pods": [{"workload": "db-prod-1", "public_key": key}]})
    assert r.status_code == 200 and r.json()["refused"][0]["status"] == 403, r.text
    node_b = _agent(api, tmp_path, "node-b")
    r = api.client.post(f"/api/v1/agents/{node_b.agent_id}/pods/enroll-batch", auth=AgentAuth(node_a),
                        json={"pods": [{"workload": "k8s.shop.db-3", "public_key": key}]})
    assert r.status_code in (401, 403), r.text
    r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/enroll-batch", auth=AgentAuth(node_a),
                        json={"pods": [{"workload": "k8s.shop.db-1", "public_key": "short"}]})
    assert r.status_code == 422 and "public_key" in r.text


def test_one_node_long_poll_carries_each_pods_own_update(api: Api, tmp_path: Path) -> None:
    _estate(api)
    node_a = _agent(api, tmp_path, "node-a")
    enrolled = {e["workload"]: e for e in _batch(api, node_a, ["k8s.shop.db-1", "k8s.shop.db-2"], tmp_path)["enrolled"]}
    ids = {w: e["agent_id"] for w, e in enrolled.items()}
    first = _poll(api, node_a, {ids["k8s.shop.db-1"]: 0, ids["k8s.shop.db-2"]: 0})
    assert first.status_code == 200, first.text
    got = {p["workload"]: p for p in first.json()["pods"]}
    assert set(got) == {"k8s.shop.db-1", "k8s.shop.db-2"} and first.json()["gone"] == []
    assert got["k8s.shop.db-1"]["policy"]["full"]["workload"] == "k8s.shop.db-1"
    held = {ids[w]: p["revision"] for w, p in got.items()}
    # acknowledged on the poll: each pod converged on its own
    assert _poll(api, node_a, held, acks=held).json() == {"pods": [], "gone": []}
    agents = {a["workload"]: a for a in api.ok("GET", "/agents") if a["workload"].startswith("k8s.shop.db-")}
    assert all(agents[w]["converged"] and agents[w]["status"] == "online" for w in ids), agents
    # the node polls again after every answer, naming all its pods: a pod's heartbeat is recorded at most
    # every HEARTBEAT_EVERY seconds (each recorded one is a row for the agent-state flush to write)
    time.sleep(0.05)
    assert _poll(api, node_a, held).status_code == 200
    beats = {a["workload"]: a["last_heartbeat"] for a in api.ok("GET", "/agents") if a["workload"] in ids}
    assert beats == {w: agents[w]["last_heartbeat"] for w in ids}

    # the node waits; a web peer arrives: the one answer brings both pods' set deltas, as their own fetch
    result: dict[str, Any] = {}

    def wait() -> None:
        t0 = time.monotonic()
        result["r"] = _poll(api, node_a, held, timeout=20)
        result["t"] = time.monotonic() - t0

    th = threading.Thread(target=wait)
    th.start()
    time.sleep(0.3)
    api.ok("POST", "/workloads", 201, json=_pod("k8s.shop.web-9", "node-b", "web", "10.60.0.9"))
    th.join(25)
    assert result["r"].status_code == 200, result["r"].text
    assert result["t"] < 10
    moved = {p["workload"]: p for p in result["r"].json()["pods"]}
    assert set(moved) == {"k8s.shop.db-1", "k8s.shop.db-2"}
    for w, p in moved.items():
        pol = p["policy"]
        assert pol["full"] is None and pol["base"] == held[ids[w]] and pol["revision"] == p["revision"]
        assert [d["added"] for d in pol["set_deltas"]] == [["10.60.0.9/32"]]
        pod = Credential("http://testserver", ids[w], enrolled[w]["token"], w,
                         StateDir(tmp_path / f"pod-{w}").key_path)
        own = api.client.get(f"/api/v1/agents/{ids[w]}/policy", params={"since": held[ids[w]]}, auth=AgentAuth(pod))
        assert own.status_code == 200 and own.json() == pol  # the same PolicyUpdate the per-pod fetch gives
    # only db-1 acknowledges: db-2 still lags (each pod its own revision and ack)
    one = {"agent_id": ids["k8s.shop.db-1"], "revision": moved["k8s.shop.db-1"]["revision"]}
    r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/acks", auth=AgentAuth(node_a), json={"acks": [one]})
    assert r.status_code == 200 and r.json() == {"gone": []}
    lagging = api.ok("GET", "/convergence")["lagging"]
    assert "k8s.shop.db-2" in lagging and "k8s.shop.db-1" not in lagging

    # a deleted pod (and a re-enrolled, so revoked, identity) is gone: no policy for it
    api.ok("DELETE", "/workloads/k8s.shop.db-2", 204)
    again = _batch(api, node_a, ["k8s.shop.db-1"], tmp_path / "again")["enrolled"][0]["agent_id"]
    r = _poll(api, node_a, {ids["k8s.shop.db-1"]: 0, ids["k8s.shop.db-2"]: 0, again: 0})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["gone"]) == sorted([ids["k8s.shop.db-1"], ids["k8s.shop.db-2"]])
    assert [p["agent_id"] for p in r.json()["pods"]] == [again]


def test_a_node_cannot_poll_ack_or_enrol_pods_not_bound_to_it(api: Api, tmp_path: Path) -> None:
    _estate(api)
    node_a, node_b = _agent(api, tmp_path, "node-a"), _agent(api, tmp_path, "node-b")
    mine = _batch(api, node_a, ["k8s.shop.db-1"], tmp_path)["enrolled"][0]["agent_id"]
    theirs = _batch(api, node_b, ["k8s.shop.db-3"], tmp_path)["enrolled"][0]["agent_id"]
    before = api.ok("GET", f"/agents/{theirs}")
    for foreign in (theirs, node_b.agent_id, "0123456789abcdef"):  # another node's pod, a node (host agent), unknown
        r = _poll(api, node_a, {mine: 0, foreign: 0})
        assert r.status_code == 403 and f"{foreign!r} is not a pod identity of node 'node-a'" in r.text, r.text
        assert "full" not in r.text
        r = _poll(api, node_a, {mine: 0}, acks={foreign: 7})
        assert r.status_code == 403, r.text
        r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/acks", auth=AgentAuth(node_a),
                            json={"acks": [{"agent_id": foreign, "revision": 7}]})
        assert r.status_code == 403, r.text
    after = api.ok("GET", f"/agents/{theirs}")
    assert after["applied_revision"] == before["applied_revision"] == 0  # nothing acknowledged for node-b's pod
    assert after["last_heartbeat"] == before["last_heartbeat"]  # nor kept alive
    # a node's pod polled in another agent's name, or by the pod's own credential: refused
    assert _poll(api, node_a, {mine: 0}, as_id=node_b.agent_id).status_code in (401, 403)
    # bad input: a clear 422 naming the field, never a 500
    for bad in ({"pods": [{"agent_id": "../x", "revision": 0}]}, {"pods": [{"agent_id": mine, "revision": -1}]},
                {"pods": [{"agent_id": mine, "revision": 0}] * 1025}, {"pods": [], "timeout": 1000},
                {"pods": [], "extra": 1}):
        r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/updates", json=bad, auth=AgentAuth(node_a))
        assert r.status_code == 422, r.text
        field = next(iter(k for k in bad if k != "pods"), "pods")
        assert field in r.text
