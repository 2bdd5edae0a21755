"""NetworkPolicy YAML -> Stockade documents: valid documents, the same reachability as the live
translation where expressible, and whole policies skipped (with the reason) where not."""

from __future__ import annotations

import ipaddress

import yaml

from stockade.evaluator import Evaluator, Verdict
from stockade.k8s.netpol_import import to_policy_documents
from stockade.model import EnforcementMode, Interface, Label, Proto, Workload
from stockade.policyfile.loader import load_documents

POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-front, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - from:
        - podSelector: {matchLabels: {app: front}}
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
        - ipBlock: {cidr: 10.9.0.0/16, except: [10.9.1.0/24]}
      ports: [{port: 8080}, {port: 9000, endPort: 9010, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: shop}
spec:
  podSelector: {}
  ingress: [{ports: [{port: http}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: exists, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: Exists}]}
  ingress: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: unmapped, namespace: shop}
spec:
  podSelector: {matchLabels: {tier: x}}
  ingress: [{}]
"""


def _wl(name: str, app: str, ns: str, ip: str) -> Workload:
    return Workload(name, frozenset({Label("app", app), Label("ns", ns)}),
                    (Interface("eth0", (ipaddress.ip_address(ip),)),), EnforcementMode.FULL)


def test_import_gives_valid_documents_and_the_same_reachability() -> None:
    docs, report = to_policy_documents([POLICIES])
    assert report.converted == ("shop/web-from-front",)
    assert dict(report.skipped).keys() == {"shop/named", "shop/exists", "shop/unmapped"}
    assert "named port" in dict(report.skipped)["shop/named"]
    assert "Exists" in dict(report.skipped)["shop/exists"]
    assert "tier" in dict(report.skipped)["shop/unmapped"]
    text = yaml.safe_dump_all(docs)
    policy = load_documents(text, "imported.yaml")
    web = _wl("web", "web", "shop", "10.1.0.1")
    front = _wl("front", "front", "shop", "10.1.0.2")
    front_elsewhere = _wl("front2", "front", "dev", "10.1.0.3")
    ops = _wl("ops", "tool", "ops", "10.1.0.4")
    ev = Evaluator(policy.with_workload(web).with_workload(front).with_workload(front_elsewhere).with_workload(ops))

    def allowed(src: str, proto: Proto, port: int) -> bool:
        e = ev.evaluate(ipaddress.ip_address(src), ipaddress.ip_address("10.1.0.1"), proto, port)
        assert e.inbound is not None
        return e.inbound.action == "allow"

    assert allowed("10.1.0.2", Proto.TCP, 8080) and not allowed("10.1.0.2", Proto.TCP, 8081)
    assert allowed("10.1.0.2", Proto.UDP, 9005) and not allowed("10.1.0.2", Proto.UDP, 9011)
    assert not allowed("10.1.0.3", Proto.TCP, 8080)  # app=front in another namespace
    assert allowed("10.1.0.4", Proto.TCP, 8080)  # namespace ops
    assert allowed("10.9.7.7", Proto.TCP, 8080) and not allowed("10.9.1.7", Proto.TCP, 8080)  # except
    assert Verdict.BLOCKED is ev.evaluate(ipaddress.ip_address("10.1.0.3"), ipaddress.ip_address("10.1.0.1"),
                                          Proto.TCP, 8080).verdict
