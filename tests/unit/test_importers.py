"""Importers: never wider than the original (random first-match rulesets against the evaluator),
bad input reported with file:line or JSON path while the rest is imported, the registry."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.errors import ValidationError
from stockade.evaluator import Evaluator, Verdict
from stockade.importers import ImportOptions, Outcome, Source, run_import
from stockade.model import Proto
from stockade.policyfile import dump_policy, load_documents

HOST = ipaddress.ip_address("10.9.0.1")
SOURCES = ["10.0.0.0/24", "10.0.0.5/32", "10.0.0.6/32", "10.0.1.0/24", None]
PORTS = ["22", "80", "80:90", None]
PROBE_SRC = [ipaddress.ip_address(a) for a in ("10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.1.3", "10.0.2.1")]
PROBE_PORTS = [22, 80, 85, 443]

rule_st = st.tuples(st.sampled_from(["ACCEPT", "DROP"]), st.sampled_from(SOURCES), st.sampled_from(PORTS),
                    st.booleans())


def _save(policy: str, rules: list[tuple[str, str | None, str | None, bool]]) -> str:
    lines = ["*filter", f":INPUT {policy} [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for target, src, port, neg in rules:
        parts = ["-A INPUT"]
        if src:
            parts.append(f"{'! ' if neg else ''}-s {src}")
        if port:
            parts.append(f"-p tcp --dport {port}")
        parts.append(f"-j {target}")
        lines.append(" ".join(parts))
    return "\n".join([*lines, "COMMIT", ""])


def _original(policy: str, rules: list[tuple[str, str | None, str | None, bool]], src: object, port: int) -> bool:
    for target, net, ports, neg in rules:
        if net is not None and (src in ipaddress.ip_network(net)) == neg:
            continue
        if ports is not None:
            lo, _, hi = ports.partition(":")
            if not int(lo) <= port <= int(hi or lo):
                continue
        return target == "ACCEPT"
    return policy == "ACCEPT"


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(["ACCEPT", "DROP"]), st.lists(rule_st, max_size=7))
def test_import_is_never_wider_and_exact_when_nothing_is_approximated(
        policy: str, rules: list[tuple[str, str | None, str | None, bool]]) -> None:
    result = run_import("iptables", [Source("h.iptables", _save(policy, rules))],
                        ImportOptions("h", {"h": (HOST,)}))
    imported = load_documents(dump_policy(result.policy), "x")
    evaluator = Evaluator(imported)
    exact = not any(f.outcome is Outcome.APPROXIMATED and f.origin.line for f in result.findings)
    for src in PROBE_SRC:
        for port in PROBE_PORTS:
            before = _original(policy, rules, src, port)
            after = evaluator.evaluate(src, HOST, Proto.TCP, port).verdict is Verdict.ALLOWED
            assert not (after and not before), f"wider: {src} -> {port}"
            if exact:
                assert after == before, f"differs: {src} -> {port}"


def test_a_bad_line_is_reported_with_file_and_line_and_the_rest_is_imported() -> None:
    text = ("*filter\n:INPUT DROP [0:0]\n-A INPUT -s 10.0.0.300 -j ACCEPT\n-A INPUT -p tcp --dport 22 -j ACCEPT\n"
            "COMMIT\n")
    result = run_import("iptables", [Source("web.rules", text)], ImportOptions())
    bad = [f for f in result.findings if f.outcome is Outcome.BAD_INPUT]
    assert [str(f.origin) for f in bad] == ["web.rules:3"]
    assert any(rs.rules for rs in result.policy.rulesets)  # the 22/tcp accept made it


def test_a_bad_nft_object_is_reported_with_its_json_path() -> None:
    text = ('{"nftables": [{"chain": {"family": "inet", "table": "t", "name": "in", "type": "filter", '
            '"hook": "input", "prio": 0, "policy": "drop"}}, 7, {"rule": {"family": "inet", "table": "t", '
            '"chain": "in", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": '
            '"dport"}}, "right": 22}}, {"accept": null}]}}]}')
    result = run_import("nftables", [Source("h.json", text)], ImportOptions())
    assert [str(f.origin) for f in result.findings if f.outcome is Outcome.BAD_INPUT] == ["h.json#/nftables/1"]
    assert result.policy.rulesets


def test_broken_json_names_its_line() -> None:
    result = run_import("windows", [Source("w.json", '{\n"Rules": [\n}')], ImportOptions())
    assert [str(f.origin) for f in result.findings] == ["w.json:3"]


NETPOL = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-front, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: front}}}], ports: [{port: 8080}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: named, namespace: shop}
spec:
  podSelector: {}
  ingress: [{ports: [{port: http}]}]
"""


def test_networkpolicy_goes_through_the_kubernetes_translation() -> None:
    result = run_import("networkpolicy", [Source("np.yaml", NETPOL), Source("bad.yaml", "a: [\n")], ImportOptions())
    assert [r.name for r in result.policy.rulesets] == ["np.shop.web-from-front"]
    by = {(f.outcome, f.construct) for f in result.findings}
    assert (Outcome.CARRIED, "NetworkPolicy shop/web-from-front") in by
    assert (Outcome.NOT_EXPRESSIBLE, "NetworkPolicy shop/named") in by  # a named port: skipped whole
    assert any(f.outcome is Outcome.BAD_INPUT and f.origin.file == "bad.yaml" for f in result.findings)


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="iptables"):
        run_import("pf", [Source("x", "")], ImportOptions())


def test_peers_that_are_imported_hosts_keep_ip_lists_when_a_label_would_widen_them() -> None:
    a = "*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -s 10.0.0.2 -p tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    b = "*filter\n:INPUT DROP [0:0]\n:OUTPUT DROP [0:0]\nCOMMIT\n"
    opts = ImportOptions(None, {"a": (ipaddress.ip_address("10.0.0.1"),), "b": (ipaddress.ip_address("10.0.0.2"),)})
    result = run_import("iptables", [Source("a.rules", a), Source("b.rules", b)], opts)
    ev = Evaluator(load_documents(dump_policy(result.policy), "x"))
    # b's own rules block everything it sends: a label-based rule would have allowed b -> a:22 at b
    verdict = ev.evaluate(ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("10.0.0.1"), Proto.TCP, 22)
    assert verdict.verdict is not Verdict.ALLOWED
