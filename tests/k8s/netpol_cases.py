"""NetworkPolicy conformance cases, written from the Kubernetes documentation and the design of
the upstream e2e suite (test/e2e/network/netpol): namespaces x, y, z (labelled ``ns=<name>``),
each with pods a, b, c (labelled ``pod=<name>``) serving TCP 80 and 81 and UDP 80 on container
ports named ``serve-80-tcp``, ``serve-81-tcp`` and ``serve-80-udp``.

A case is a list of steps; each step changes something (policies, pod or namespace labels) and
states the expected 9x9 reachability for the ports the case is about, as a predicate over
(source pod, destination pod, port) with pods written ``"x/a"``. A pod always reaches itself
(upstream's ``AllowLoopback``); the diagonal is not probed. The same cases drive the in-memory
unit test (tests/unit/test_netpol.py) and the kernel conformance test (tests/k8s/test_netpol_conformance.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL_PODS = tuple(f"{n}/{p}" for n in NAMESPACES for p in PODS)
PORTS = {"tcp80": ("TCP", 80), "tcp81": ("TCP", 81), "udp80": ("UDP", 80), "sctp80": ("SCTP", 80)}
CONTAINER_PORTS = (("serve-80-tcp", "TCP", 80), ("serve-81-tcp", "TCP", 81), ("serve-80-udp", "UDP", 80),
                   ("serve-80-sctp", "SCTP", 80))

Expect = Callable[[str, str, str], bool]  # (src "x/a", dst "y/b", port key) -> reachable


@dataclass(frozen=True)
class Step:
    expect: Expect
    policies: tuple[dict[str, Any], ...] = ()  # created or replaced
    delete: tuple[tuple[str, str], ...] = ()  # (namespace, name)
    pod_labels: tuple[tuple[str, dict[str, str | None]], ...] = ()  # ("y/c", {"pod": "b"})
    ns_labels: tuple[tuple[str, dict[str, str | None]], ...] = ()  # ("z", {"ns": "y"})


@dataclass(frozen=True)
class Case:
    name: str
    steps: tuple[Step, ...]
    ports: tuple[str, ...] = ("tcp80",)
    relabels: bool = field(default=False)
    v6: bool = True  # False: the case is about IPv4 addresses (ipBlock), probe IPv4 only


def np(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


def ns_of(pod: str) -> str:
    return pod.split("/")[0]


def name_of(pod: str) -> str:
    return pod.split("/")[1]


ALL: Expect = lambda s, d, p: True  # noqa: E731
POD_A = {"matchLabels": {"pod": "a"}}
POD_B = {"matchLabels": {"pod": "b"}}
POD_C = {"matchLabels": {"pod": "c"}}
NS_Y = {"matchLabels": {"ns": "y"}}


def a_from(name: str, *peers: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Policy ``name`` in x selecting x/a, with one ingress rule from ``peers`` (none: all) on ``ports``."""
    rule: dict[str, Any] = {"from": list(peers)} if peers else {}
    if ports is not None:
        rule["ports"] = ports
    return np("x", name, {"podSelector": POD_A, "ingress": [rule]})


def a_to(name: str, *peers: dict[str, Any], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Policy ``name`` in x isolating x/a's egress, with one egress rule to ``peers`` on ``ports``."""
    rule: dict[str, Any] = {"to": list(peers)} if peers else {}
    if ports is not None:
        rule["ports"] = ports
    return np("x", name, {"podSelector": POD_A, "policyTypes": ["Egress"], "egress": [rule]})


def block(cidr: str, *excepts: str) -> dict[str, Any]:
    return {"ipBlock": {"cidr": cidr, "except": list(excepts)}} if excepts else {"ipBlock": {"cidr": cidr}}


def cases(pod_cidr_v4: str, ip_of: Callable[[str], str]) -> tuple[Case, ...]:
    """Every case; ``pod_cidr_v4`` is the range of all pod IPs, ``ip_of("y/b")`` a pod's IPv4."""

    def into_xa(d: str) -> bool:
        return d == "x/a"

    deny_in = {"podSelector": {}, "policyTypes": ["Ingress"]}
    deny_out = {"podSelector": {}, "policyTypes": ["Egress"]}
    deny_both = {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    not_y_not_c = {
        "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["y"]}]},
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
    }
    tcp_ports = ("tcp80", "tcp81")
    all_ports = ("tcp80", "tcp81", "udp80", "sctp80")
    return (
        Case("default-deny-ingress", (Step(lambda s, d, p: ns_of(d) != "x", (np("x", "deny", deny_in),)),)),
        Case("default-deny-egress", (Step(lambda s, d, p: ns_of(s) != "x", (np("x", "deny", deny_out),)),)),
        Case("default-deny-both-all-ports",
             (Step(lambda s, d, p: "y" not in (ns_of(s), ns_of(d)), (np("y", "deny", deny_both),)),),
             ports=("tcp80", "udp80")),
        Case("allow-all-ingress-over-deny",
             (Step(ALL, (np("x", "deny", deny_in), np("x", "allow-all", {"podSelector": {}, "ingress": [{}]}))),)),
        Case("pod-selector-same-namespace",
             (Step(lambda s, d, p: not into_xa(d) or s == "x/b", (a_from("a-from-b", {"podSelector": POD_B}),)),)),
        Case("namespace-selector", (Step(lambda s, d, p: not into_xa(d) or ns_of(s) == "y",
                                         (a_from("a-from-y", {"namespaceSelector": NS_Y}),)),)),
        Case("pod-and-namespace-selector", (Step(lambda s, d, p: not into_xa(d) or s == "y/c", (
            a_from("a-from-yc", {"namespaceSelector": NS_Y, "podSelector": POD_C}),)),)),
        Case("pod-or-namespace-selector", (Step(lambda s, d, p: not into_xa(d) or s == "x/b" or ns_of(s) == "y", (
            a_from("a-from-xb-or-y", {"podSelector": POD_B}, {"namespaceSelector": NS_Y}),)),)),
        Case("match-expressions", (Step(lambda s, d, p: not into_xa(d) or (ns_of(s) != "y" and name_of(s) != "c"),
                                        (a_from("a-from-not-y-not-c", not_y_not_c),)),)),
        Case("ip-block-except", (Step(lambda s, d, p: not into_xa(d) or s != "y/b", (
            a_from("a-from-block", block(pod_cidr_v4, f"{ip_of('y/b')}/32")),)),), v6=False),
        Case("egress-to-pod-on-port", (Step(lambda s, d, p: s != "x/a" or (d == "y/b" and p == "tcp80"), (
            a_to("a-to-yb-80", {"namespaceSelector": NS_Y, "podSelector": POD_B}, ports=[{"port": 80}]),)),),
             ports=tcp_ports),
        Case("egress-ip-block", (Step(lambda s, d, p: s != "x/a" or d in ("z/a", "z/c"), (
            a_to("a-to-z-block", block(f"{ip_of('z/a')}/32"), block(f"{ip_of('z/c')}/32")),)),), v6=False),
        Case("ports-protocols", (
            Step(lambda s, d, p: not into_xa(d) or p == "tcp81", (a_from("a-81", ports=[{"port": 81}]),)),
            Step(lambda s, d, p: not into_xa(d) or p == "udp80",
                 (a_from("a-81", ports=[{"port": 80, "protocol": "UDP"}]),)),
            Step(lambda s, d, p: not into_xa(d) or p == "sctp80",
                 (a_from("a-81", ports=[{"port": 80, "protocol": "SCTP"}]),))), ports=all_ports),
        Case("sctp-range-and-named", (
            Step(lambda s, d, p: not into_xa(d) or (p == "sctp80" and ns_of(s) == "y"),
                 (a_from("a-sctp", {"namespaceSelector": NS_Y},
                         ports=[{"port": 79, "endPort": 81, "protocol": "SCTP"}]),)),
            Step(lambda s, d, p: not into_xa(d) or p in ("sctp80", "tcp80"),
                 (a_from("a-sctp", ports=[{"port": "serve-80-sctp", "protocol": "SCTP"}, {"port": 80}]),))),
             ports=("tcp80", "sctp80")),
        Case("named-ports", (Step(lambda s, d, p: not into_xa(d) or p in ("tcp81", "udp80"), (
            a_from("a-named", ports=[{"port": "serve-81-tcp"}, {"port": "serve-80-udp", "protocol": "UDP"}]),)),),
             ports=all_ports),
        Case("egress-named-port", (Step(lambda s, d, p: s != "x/a" or (ns_of(d) == "z" and p == "udp80"), (
            a_to("a-to-z-named", {"namespaceSelector": {"matchLabels": {"ns": "z"}}},
                 ports=[{"port": "serve-80-udp", "protocol": "UDP"}]),)),), ports=("tcp80", "udp80")),
        Case("end-port", (
            Step(lambda s, d, p: not into_xa(d) or p == "tcp81",
                 (a_from("a-range", ports=[{"port": 81, "endPort": 90}]),)),
            Step(lambda s, d, p: not into_xa(d) or p in tcp_ports,
                 (a_from("a-range", ports=[{"port": 79, "endPort": 81}]),))), ports=tcp_ports),
        Case("policy-types-egress-only-ignores-ingress-rules", (Step(lambda s, d, p: s != "x/a", (
            np("x", "egress-only", {"podSelector": POD_A, "policyTypes": ["Egress"], "ingress": [{}]}),)),)),
        Case("multiple-policies-union", (
            Step(lambda s, d, p: not into_xa(d) or s in ("x/b", "y/c"), (
                a_from("from-xb", {"podSelector": POD_B}),
                a_from("from-yc", {"namespaceSelector": NS_Y, "podSelector": POD_C}))),
            Step(lambda s, d, p: not into_xa(d) or s == "y/c", delete=(("x", "from-xb"),)))),
        Case("policy-update", (
            Step(lambda s, d, p: not into_xa(d) or s == "x/b", (a_from("upd", {"podSelector": POD_B}),)),
            Step(lambda s, d, p: not into_xa(d) or s == "x/c", (a_from("upd", {"podSelector": POD_C}),)),
            Step(ALL, delete=(("x", "upd"),)))),
        Case("pod-relabel-while-policy-stands", (
            Step(lambda s, d, p: not into_xa(d) or s == "x/b", (a_from("a-from-b", {"podSelector": POD_B}),)),
            Step(lambda s, d, p: not into_xa(d) or s in ("x/b", "x/c"), pod_labels=(("x/c", {"pod": "b"}),)),
            Step(lambda s, d, p: d not in ("x/a", "x/b") or s == "x/c",
                 pod_labels=(("x/b", {"pod": "a"}),)),  # x/b is now selected by the policy too
        ), relabels=True),
        Case("namespace-relabel-while-policy-stands", (
            Step(lambda s, d, p: not into_xa(d) or ns_of(s) == "y", (a_from("a-from-y", {"namespaceSelector": NS_Y}),)),
            Step(lambda s, d, p: not into_xa(d) or ns_of(s) in ("y", "z"), ns_labels=(("z", {"ns": "y"}),)),
            Step(lambda s, d, p: not into_xa(d) or ns_of(s) == "z", ns_labels=(("y", {"ns": "q"}),)),
        ), relabels=True),
    )
