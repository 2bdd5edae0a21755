"""Node agents enrol only the pods bound to their own node (issue 15), on SQLite and PostgreSQL.

The class: a node credential must never yield the identity (and so the policy) of a pod on
another node, of a pod the sync has not bound, or of any non-pod workload; a pod with an agent
from elsewhere is not taken over; a re-enrolment by the same node revokes the old credential.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stockade.agent.signing import AgentAuth
from stockade.agent.state import Credential, StateDir
from stockade.agent_signature import public_key_text
from tests.api.conftest import Api


def _estate(api: Api) -> None:
    api.ok("POST", "/label-keys", 201, json={"name": "k8s-node", "values": []})
    api.ok("POST", "/pairing-profiles", 201, json={"name": "k8s-nodes", "mode": "idle", "code_max_uses": 5})
    for name, labels in (("k8s.shop.web-1", {"k8s-node": "node-a"}), ("k8s.shop.db-1", {"k8s-node": "node-b"}),
                         ("k8s.shop.unbound", {}), ("db-prod-1", {"k8s-node": "node-a"})):
        api.ok("POST", "/workloads", 201, json={"name": name, "labels": labels, "mode": "full"})


def _agent(api: Api, tmp: Path, hostname: str, code: str | None = None) -> Credential:
    state = StateDir(tmp / hostname)
    key = public_key_text(state.load_or_create_key())
    code = code or str(api.ok("POST", "/pairing-profiles/k8s-nodes/codes", 201)["code"])
    r = api.client.post("/api/v1/agents/enroll", json={"activation_code": code, "hostname": hostname,
                                                       "public_key": key})
    assert r.status_code == 201, r.text
    return Credential("http://testserver", r.json()["agent_id"], r.json()["token"], r.json()["workload"],
                      state.key_path)


def _enrol_pod(api: Api, node: Credential, pod: str, tmp: Path, as_id: str | None = None) -> Any:
    key = public_key_text(StateDir(tmp / f"pod-{pod}").load_or_create_key())
    return api.client.post(f"/api/v1/agents/{as_id or node.agent_id}/pods/enroll",
                           json={"workload": pod, "public_key": key}, auth=AgentAuth(node))


def test_a_node_enrols_its_own_pod_and_nothing_else(api: Api, tmp_path: Path) -> None:
    _estate(api)
    node_a, node_b = _agent(api, tmp_path, "node-a"), _agent(api, tmp_path, "node-b")
    ok = _enrol_pod(api, node_a, "k8s.shop.web-1", tmp_path)
    assert ok.status_code == 201, ok.text
    assert ok.json()["workload"] == "k8s.shop.web-1"
    for pod in ("k8s.shop.db-1", "k8s.shop.unbound"):  # another node's pod, a pod not bound by the sync
        r = _enrol_pod(api, node_a, pod, tmp_path)
        assert r.status_code == 403 and "not bound to node 'node-a'" in r.json()["message"], r.text
    r = _enrol_pod(api, node_a, "db-prod-1", tmp_path)  # labelled like node-a's pod, but not a pod workload
    assert r.status_code == 403 and "not a Kubernetes pod" in r.json()["message"], r.text
    r = _enrol_pod(api, node_a, "k8s.shop.missing", tmp_path)
    assert r.status_code == 404, r.text
    r = _enrol_pod(api, node_a, "k8s.shop.web-1", tmp_path, as_id=node_b.agent_id)  # in another agent's name
    assert r.status_code in (401, 403), r.text
    assert _enrol_pod(api, node_b, "k8s.shop.db-1", tmp_path).status_code == 201
    r = _enrol_pod(api, node_b, "k8s.shop.web-1", tmp_path)
    assert r.status_code == 403, r.text
    bad = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/enroll", auth=AgentAuth(node_a),
                          json={"workload": "k8s.shop.web-1", "public_key": "short"})
    assert bad.status_code == 422 and "public_key" in bad.text
    events = api.ok("GET", "/events", params={"action": "agent.enroll", "limit": "50"})
    items = events["items"] if isinstance(events, dict) else events
    assert any(e["actor"] == f"agent:{node_a.agent_id}" for e in items), items  # audited as the node


def test_a_re_enrolment_by_the_same_node_revokes_the_old_pod_credential(api: Api, tmp_path: Path) -> None:
    _estate(api)
    node_a = _agent(api, tmp_path, "node-a")
    first = _enrol_pod(api, node_a, "k8s.shop.web-1", tmp_path)
    assert first.status_code == 201
    second = _enrol_pod(api, node_a, "k8s.shop.web-1", tmp_path / "again")
    assert second.status_code == 201
    live = [a for a in api.ok("GET", "/agents", params={"workload": "k8s.shop.web-1"}) if not a["revoked"]]
    assert [a["id"] for a in live] == [second.json()["agent_id"]]


def test_a_pod_with_an_agent_from_elsewhere_is_not_taken_over(api: Api, tmp_path: Path) -> None:
    _estate(api)
    adopt = str(api.ok("POST", "/pairing-profiles/k8s-nodes/codes", 201,
                       json={"workload": "k8s.shop.web-1", "max_uses": 1})["code"])
    _agent(api, tmp_path, "sidecar", code=adopt)  # an ordinary agent enrolled as the pod's workload
    node_a = _agent(api, tmp_path, "node-a")
    r = _enrol_pod(api, node_a, "k8s.shop.web-1", tmp_path)
    assert r.status_code == 409, r.text


def test_the_enrolment_brings_the_pods_own_first_policy_only_when_asked(api: Api, tmp_path: Path) -> None:
    """``include_policy``: the answer carries the pod's own full policy at the current revision (the
    node agent applies it at once), the same as the new identity's ``GET /policy``; a refused
    enrolment carries nothing; without the flag the answer is as before."""
    _estate(api)
    node_a = _agent(api, tmp_path, "node-a")
    key = public_key_text(StateDir(tmp_path / "pod-fast").load_or_create_key())
    r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/enroll", auth=AgentAuth(node_a),
                        json={"workload": "k8s.shop.web-1", "public_key": key, "include_policy": True})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["policy"]["full"]["workload"] == "k8s.shop.web-1"
    assert body["policy"]["full"]["mode"] == "full"
    assert body["policy"]["revision"] == body["revision"] >= 1
    pod = Credential("http://testserver", body["agent_id"], body["token"], body["workload"],
                     StateDir(tmp_path / "pod-fast").key_path)
    fetched = api.client.get(f"/api/v1/agents/{pod.agent_id}/policy", auth=AgentAuth(pod))
    assert fetched.status_code == 200 and fetched.json() == body["policy"]
    refused = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/enroll", auth=AgentAuth(node_a),
                              json={"workload": "k8s.shop.db-1", "public_key": key, "include_policy": True})
    assert refused.status_code == 403 and "policy" not in refused.json() and "full" not in refused.text
    plain = _enrol_pod(api, node_a, "k8s.shop.web-1", tmp_path / "plain")
    assert plain.status_code == 201 and plain.json()["policy"] is None
