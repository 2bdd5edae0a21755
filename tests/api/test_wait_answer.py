"""The long-poll's inline answer encodes a set delta once per process, not once per agent.

A global change wakes every agent with the same set deltas of its label set (one SetDelta object
per label set from the compiler); each answer used to go through ``policy_update_to_dict`` and
JSONResponse, spelling the same CIDRs once per agent. The answer is now written as text around
``node_distribution.update_json``, whose set-delta text is kept per delta object. The answer is
unchanged: the same JSON fields, decoded by the agent's one wire codec.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from starlette.responses import JSONResponse
from tests.api.conftest import Api
from tests.api.test_agents import POLICY, _enrolled_db, enroll, profile

from stockade.compiler import delta as delta_module
from stockade.compiler.delta import UpdateKind, apply_update, policy_update_from_dict
from stockade.controller.services import node_distribution


def test_agents_sharing_a_label_set_share_one_encoding_of_its_delta(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    code = profile(api, code_max_uses=10)
    agents = []
    for i in range(3):
        r = enroll(api, code, f"db-{i}", f"10.0.0.{i + 2}")
        assert r.status_code == 201, r.text
        agents.append((r.json()["agent_id"], api.headers(r.json()["token"])))
    held = {}
    for aid, token in agents:
        full = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token))
        held[aid] = full
    encoded: list[Any] = []
    real = delta_module.set_delta_to_dict

    def counting(d: Any) -> Any:
        encoded.append(d)
        return real(d)

    monkeypatch.setattr(delta_module, "set_delta_to_dict", counting)
    monkeypatch.setattr(node_distribution, "set_delta_to_dict", counting)
    api.ok("POST", "/workloads", 201, json={"name": "web-1", "labels": {"app": "shop", "role": "web"},
                                            "interfaces": [{"name": "eth0", "addresses": ["10.0.9.1"]}]})
    for aid, token in agents:
        before = held[aid]
        r = api.client.get(f"/api/v1/agents/{aid}/policy/wait", headers=token,
                           params={"after": before.revision, "timeout": 0, "include_policy": "true"})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.headers
        got = r.json()
        assert set(got) == {"revision", "changed", "policy", "heartbeat", "hold"} and got["changed"] is True
        upd = policy_update_from_dict(got["policy"])
        assert upd.kind is UpdateKind.DELTA and got["revision"] == upd.revision == before.revision + 1
        assert before.policy is not None
        now = policy_update_from_dict(api.ok("GET", f"/agents/{aid}/policy", headers=token))
        assert apply_update(before.policy, before.revision, upd) == now.policy
    assert len(encoded) == 1, encoded  # three answers, one encoding of the web set's delta


@pytest.mark.parametrize("hold", [120.0, 37.25, 1e-3])
def test_a_poll_answer_without_policy_is_the_bytes_jsonresponse_renders(sqlite_api: Api, hold: float) -> None:
    """The answer without an inline policy is written as text (every held poll ends with one)."""
    api = sqlite_api
    aid, token = _enrolled_db(api)
    rev = api.ctl.dist.revisions["db-1"]
    api.ctl.settings = dataclasses.replace(api.ctl.settings, long_poll_hold=hold)
    for after, include in ((rev, "false"), (rev, "true"), (rev - 1, "false"), (rev + 5, "false")):
        got = api.client.get(f"/api/v1/agents/{aid}/policy/wait", headers=token,
                             params={"after": after, "timeout": 0, "include_policy": include})
        want = JSONResponse({"revision": rev, "changed": rev > after, "policy": None, "heartbeat": True,
                             "hold": hold})
        assert got.status_code == 200 and got.content == want.body, (after, include, got.content)
        assert [(k, v) for k, v in got.headers.items() if k in ("content-type", "content-length")] == [
            (k.decode(), v.decode()) for k, v in want.raw_headers]
