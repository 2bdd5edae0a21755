"""The controller shows per host whether the applied policy is proven, only applied, or differs.

An enrolled agent acknowledges a revision (``applied``), reports ``proven`` for it (``proven``),
then ``proof-differs`` (``differs``, with the packet); a proof of an older revision does not
count for a newer one (``applied`` again).
"""

from __future__ import annotations

from tests.api.conftest import Api
from tests.api.test_agents import POLICY, enroll, profile


def test_agent_list_shows_proven_applied_differs(api: Api) -> None:
    for path, body in POLICY:
        api.ok("POST", path, 201, json=body)
    api.ok("POST", "/policy/provision", 201, json={"message": "v1"})
    r = enroll(api, profile(api), "db-1", "10.0.0.2")
    assert r.status_code == 201, r.text
    aid, token = r.json()["agent_id"], api.headers(r.json()["token"])
    assert api.ok("GET", f"/agents/{aid}")["enforcement"] == "pending"
    rev = api.ok("GET", f"/agents/{aid}/policy", headers=token)["revision"]
    api.ok("POST", f"/agents/{aid}/ack", 204, headers=token, json={"revision": rev})
    assert api.ok("GET", f"/agents/{aid}")["enforcement"] == "applied"

    def report(kind: str, detail: str, revision: int) -> None:
        api.ok("POST", f"/agents/{aid}/events", 204, headers=token,
               json={"events": [{"kind": kind, "detail": detail, "revision": revision}]})

    report("proven", f"proven at revision {rev}: 3 address classes in 4 ms", rev)
    got = api.ok("GET", f"/agents/{aid}")
    assert got["enforcement"] == "proven" and got["proof_detail"].startswith(f"proven at revision {rev}")
    report("proof-differs", "inbound tcp 10.0.0.1:32768 -> 10.0.0.2:5432: policy says accept, kernel does drop", rev)
    got = api.ok("GET", "/agents")[0]
    assert got["enforcement"] == "differs" and "kernel does drop" in got["proof_detail"]
    report("proven", "proven at an older revision", rev - 1)
    assert api.ok("GET", f"/agents/{aid}")["enforcement"] == "applied"
    actions = {e["action"] for e in api.ok("GET", "/events", params={"kind": "agent"})["items"]}
    assert {"agent.proven", "agent.proof-differs"} <= actions
