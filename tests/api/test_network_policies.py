"""The stored kind ``network_policy`` (what the cluster sync writes): CRUD on SQLite and PostgreSQL,
its effect on the pods' compiled policies at once (no provision), set deltas for peer churn, and
bodies that name the bad field with a 422."""

from __future__ import annotations

from typing import Any

import pytest
from tests.api.conftest import Api


def _pod(name: str, v4: str, app: str) -> dict[str, Any]:
    return {"name": name, "labels": {"app": app}, "mode": "selective",
            "interfaces": [{"name": "eth0", "addresses": [v4]}]}


def _netpol(peers: list[str], ports: list[str] | None = None) -> dict[str, Any]:
    return {"name": "k8s.x.a-from-b", "namespace": "x", "policy": "a-from-b", "selected": ["k8s.x.a"],
            "isolates": ["ingress"], "problems": [],
            "rules": [{"direction": "ingress", "index": 0, "targets": ["k8s.x.a"], "any_peer": False,
                       "peer_workloads": peers, "peer_cidrs": ["192.0.2.0/24"], "ports": ports or ["80/tcp"]}]}


def _setup(api: Api) -> None:
    for name, ip, app in (("k8s.x.a", "10.244.0.10", "a"), ("k8s.x.b", "10.244.0.11", "b"),
                          ("k8s.x.c", "10.244.0.12", "c")):
        api.ok("POST", "/workloads", 201, json=_pod(name, ip, app))


def _inbound(api: Api, name: str) -> list[dict[str, Any]]:
    hp = api.ok("GET", f"/workloads/{name}/host-policy")["policy"]
    return [r for r in hp["rules"] if r["direction"] == "in"]


def test_a_network_policy_takes_effect_at_once_and_leaves_with_its_delete(api: Api) -> None:
    _setup(api)
    assert _inbound(api, "k8s.x.a") == []
    created = api.ok("POST", "/network-policies", 201, json=_netpol(["k8s.x.b"]))
    assert created["body"] == _netpol(["k8s.x.b"])  # canonical already
    rules = _inbound(api, "k8s.x.a")
    assert [(r["action"], r["rule_id"]) for r in rules] == [
        ("allow", "netpol/x/a-from-b/ingress/0"), ("deny", "netpol/x/a-from-b/ingress")]
    hp = api.ok("GET", "/workloads/k8s.x.a/host-policy")["policy"]
    peer = next(s for s in hp["sets"] if s["name"] == rules[0]["peer"] and s["family"] == 4)
    assert peer["members"] == ["10.244.0.11/32", "192.0.2.0/24"]
    assert _inbound(api, "k8s.x.b") == []  # not selected: unaffected
    # a peer joins: same rules, one more member
    api.ok("PUT", "/network-policies/k8s.x.a-from-b", json=_netpol(["k8s.x.b", "k8s.x.c"]))
    assert _inbound(api, "k8s.x.a") == rules
    hp = api.ok("GET", "/workloads/k8s.x.a/host-policy")["policy"]
    peer = next(s for s in hp["sets"] if s["name"] == rules[0]["peer"] and s["family"] == 4)
    assert peer["members"] == ["10.244.0.11/32", "10.244.0.12/32", "192.0.2.0/24"]
    api.ok("DELETE", "/network-policies/k8s.x.a-from-b", 204)
    assert _inbound(api, "k8s.x.a") == []
    assert "k8s.x.a-from-b" not in [o["name"] for o in api.ok("GET", "/network-policies")["items"]]


@pytest.mark.parametrize(("change", "field"), [
    ({"name": "k8s.x.other"}, "name"),
    ({"isolates": ["sideways"]}, "isolates"),
    ({"namespace": "X_Y"}, "namespace"),
    ({"rules": [{"direction": "ingress", "index": 0, "targets": [], "any_peer": False, "peer_workloads": [],
                 "peer_cidrs": ["10.0.0.300/32"], "ports": []}]}, "rules[0].peer_cidrs[0]"),
    ({"rules": [{"direction": "ingress", "index": 0, "targets": [], "any_peer": False, "peer_workloads": [],
                 "peer_cidrs": [], "ports": ["80/dccp"]}]}, "rules[0].ports[0]"),
    ({"selected": ["no/slash"]}, "selected"),
])
def test_bad_bodies_are_422_naming_the_field(sqlite_api: Api, change: dict[str, Any], field: str) -> None:
    r = sqlite_api.req("POST", "/network-policies", json={**_netpol(["k8s.x.b"]), **change})
    assert r.status_code == 422, r.text
    assert field in r.text


def test_a_principal_scoped_elsewhere_cannot_isolate_pods_outside_its_scope(sqlite_api: Api) -> None:
    _setup(sqlite_api)
    scoped = sqlite_api.key("admin", ["app=b"])
    r = sqlite_api.req("POST", "/network-policies", json=_netpol(["k8s.x.b"]), headers=scoped)
    assert r.status_code == 403, r.text
    assert sqlite_api.ok("GET", "/network-policies")["items"] == []
    assert _inbound(sqlite_api, "k8s.x.a") == []


class _InProcess:
    """What ``stockade.cli`` gets from ``_client``: the in-process API under /api/v1."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return self.api.req("GET", path, params=params)


def test_explain_remote_names_the_network_policy(sqlite_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from stockade.cli import main, policy_cmds

    _setup(sqlite_api)
    sqlite_api.ok("POST", "/network-policies", 201, json=_netpol(["k8s.x.b"]))
    monkeypatch.setattr(policy_cmds, "_client", lambda *a: _InProcess(sqlite_api))
    runner = CliRunner()
    allowed = runner.invoke(main, ["explain", "--remote", "draft", "--from", "k8s.x.b", "--to", "k8s.x.a",
                                   "--port", "80/tcp", "--api-key", "unused"])
    assert allowed.exit_code == 0, allowed.output
    assert "verdict: allowed" in allowed.output
    assert "NetworkPolicy x/a-from-b ingress rule 1" in allowed.output
    blocked = runner.invoke(main, ["explain", "--remote", "draft", "--from", "k8s.x.c", "--to", "k8s.x.a",
                                   "--port", "80/tcp", "--api-key", "unused"])
    assert "verdict: blocked" in blocked.output
    assert "NetworkPolicy x/a-from-b (ingress isolated, no NetworkPolicy rule allows)" in blocked.output
