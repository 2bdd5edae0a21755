"""The node long-poll's hot path (issue 15, bench/k8s_fanout.py): cached, and still exact.

* :func:`~stockade.controller.services.node_distribution.encode_answer` writes the answer's JSON
  itself, a set delta shared between pods encoded once; it must say exactly what
  ``policy_update_to_dict`` says, for every kind of update;
* a pod's node is cached per workload object: a pod moved to another node (its ``k8s-node``
  label rewritten, as the sync does when a pod name is reused on another node) is ``gone`` for the
  old node at once, and its long-poll refuses nothing it should not.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from tests.api.conftest import Api
from tests.security.test_node_poll import _batch, _estate, _pod, _poll
from tests.security.test_pod_enrolment import _agent

from stockade.agent.signing import AgentAuth
from stockade.compiler.delta import PolicyUpdate, policy_update_to_dict, set_delta_to_dict
from stockade.compiler.ir import HostPolicy, PeerDelta, SetDelta
from stockade.controller.services import node_distribution
from stockade.controller.services.node_distribution import HeldPod, encode_answer, update_json
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.workloads import EnforcementMode


def _delta(name: str, *added: str) -> SetDelta:
    return SetDelta(name, Family.V4, tuple(ipaddress.ip_network(a) for a in added), ())


def test_the_answer_says_what_policy_update_to_dict_says_for_every_kind() -> None:
    shared = _delta("app-web", "10.0.0.1/32", "10.0.0.2/32")
    updates = [
        PolicyUpdate.full(3, HostPolicy("k8s.a.b", EnforcementMode.FULL, (), (), (), Failsafe())),
        PolicyUpdate.unchanged(4),
        PolicyUpdate.delta(4, 5, (shared, _delta("app-db", "10.0.1.1/32"))),
        PolicyUpdate.delta(7, 8, (shared,)),
        PolicyUpdate.delta(4, 5, (), PeerDelta((), ("k8s.gone.pod",))),  # peers: the plain encoder
        PolicyUpdate.delta(4, 5, ()),
    ]
    for u in updates:
        assert json.loads(update_json(u)) == policy_update_to_dict(u), u
    pods = [(HeldPod(f"{i:016x}", f"k8s.ns.pod-\u00e9{i}", 1), u) for i, u in enumerate(updates)]
    assert json.loads(encode_answer(pods, ("00000000000000aa",))) == {
        "pods": [{"agent_id": p.agent_id, "workload": p.workload, "revision": u.revision,
                  "policy": policy_update_to_dict(u)} for p, u in pods],
        "gone": ["00000000000000aa"]}


def test_a_delta_shared_by_many_pods_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[SetDelta] = []
    real = set_delta_to_dict

    def counting(d: SetDelta) -> dict[str, object]:
        calls.append(d)
        return real(d)

    monkeypatch.setattr(node_distribution, "set_delta_to_dict", counting)
    monkeypatch.setattr(node_distribution, "_DELTA_JSON", {})
    shared = _delta("app-web", "10.0.0.9/32")
    answers = [encode_answer([(HeldPod(f"{i:016x}", f"k8s.ns.p{i}", 1), PolicyUpdate.delta(1, 2, (shared,)))], ())
               for i in range(50)]
    assert len(calls) == 1 and len(set(answers)) == 50
    # an equal delta that is another object is encoded again (the cache is by identity, never by content)
    encode_answer([(HeldPod("0" * 16, "k8s.ns.x", 1), PolicyUpdate.delta(1, 2, (_delta("app-web", "10.0.0.9/32"),)))],
                  ())
    assert len(calls) == 2


def test_a_pod_moved_to_another_node_is_gone_for_the_old_one(api: Api, tmp_path: Path) -> None:
    _estate(api)
    node_a = _agent(api, tmp_path, "node-a")
    pod = _batch(api, node_a, ["k8s.shop.db-1"], tmp_path)["enrolled"][0]["agent_id"]
    first = _poll(api, node_a, {pod: 0})
    assert first.status_code == 200 and [p["agent_id"] for p in first.json()["pods"]] == [pod]
    held = {pod: first.json()["pods"][0]["revision"]}
    assert _poll(api, node_a, held).json() == {"pods": [], "gone": []}  # its node is cached now
    api.ok("PUT", "/workloads/k8s.shop.db-1", 200, json=_pod("k8s.shop.db-1", "node-b", "db", "10.60.0.1"))
    r = _poll(api, node_a, held, acks=held)
    assert r.status_code == 200 and r.json() == {"pods": [], "gone": [pod]}, r.text
    r = api.client.post(f"/api/v1/agents/{node_a.agent_id}/pods/acks", auth=AgentAuth(node_a),
                        json={"acks": [{"agent_id": pod, "revision": held[pod]}]})
    assert r.status_code == 200 and r.json() == {"gone": [pod]}
    # moved back: bound to node-a again
    api.ok("PUT", "/workloads/k8s.shop.db-1", 200, json=_pod("k8s.shop.db-1", "node-a", "db", "10.60.0.1"))
    r = _poll(api, node_a, {pod: 0})
    assert r.status_code == 200 and [p["agent_id"] for p in r.json()["pods"]] == [pod] and r.json()["gone"] == []
