"""F5 AFM semantics vs the reference evaluator, without a BIG-IP.

An interpreter walks the rendered JSON (the policy's ordered rules, the address and port
lists they name, the virtual server's enforced/staged policy) the way AFM does: first
matching rule wins. Virtual servers only receive connections, so the check is the inbound
side of every workload, rendered with its outbound rules left out (they cannot affect an
inbound decision): allow -> accept, block -> drop by the enforced policy, would-block
(visibility) -> accepted, and dropped by the *staged* policy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from itertools import permutations
from typing import Any

from hypothesis import HealthCheck, given, settings

from stockade.backends.f5.render import NONE, F5Artifact, render_f5
from stockade.compiler import Direction, compile_policy
from stockade.evaluator import Evaluator
from stockade.model import IPAddress, Policy, Proto
from tests.unit.test_windows_semantics import PROBES, policies

PROTO_NAME = {Proto.TCP: "tcp", Proto.UDP: "udp", Proto.ICMP: "icmp", Proto.ICMPV6: "ipv6-icmp"}


def _in_list(addr: IPAddress, entries: list[dict[str, Any]]) -> bool:
    for e in entries:
        net = ipaddress.ip_network(e["name"])
        if net.version == addr.version and addr in net:
            return True
    return False


def _port_in(port: int | None, entries: list[dict[str, Any]]) -> bool:
    if port is None:
        return False
    for e in entries:
        lo, _, hi = e["name"].partition("-")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def afm_decision(doc: dict[str, Any], policy_path: str, peer: IPAddress, proto: Proto, port: int | None) -> str:
    """accept/drop by the policy at ``policy_path`` in the rendered document."""
    assert policy_path == f"/{doc['policy']['partition']}/{doc['policy']['name']}"
    lists = {f"/{a['partition']}/{a['name']}": a["addresses"] for a in doc["addressLists"]}
    ports = {f"/{p['partition']}/{p['name']}": p["ports"] for p in doc["portLists"]}
    for rule in doc["policy"]["rules"]:
        if rule["status"] != "enabled":
            continue
        if rule["ipProtocol"] != "any" and rule["ipProtocol"] != PROTO_NAME.get(proto):
            continue
        src = rule["source"].get("addressLists", [])
        if src and not any(_in_list(peer, lists[p]) for p in src):
            continue
        dst_ports = rule["destination"].get("portLists", [])
        if dst_ports and not any(_port_in(port, ports[p]) for p in dst_ports):
            continue
        icmp = [i["name"] for i in rule.get("icmp", [])]
        if icmp and str(port) not in icmp:
            continue
        return "accept" if rule["action"] in ("accept", "accept-decisively") else "drop"
    raise AssertionError("no rule matched: the policy must end with a default rule")


def f5_side(art: F5Artifact, peer: IPAddress, proto: Proto, port: int | None) -> str:
    doc = art.document()
    vs = doc["virtualServer"]
    if vs["fwEnforcedPolicy"] != NONE:
        assert vs["fwStagedPolicy"] == NONE
        return "allow" if afm_decision(doc, vs["fwEnforcedPolicy"], peer, proto, port) == "accept" else "block"
    assert vs["fwStagedPolicy"] != NONE
    staged = afm_decision(doc, vs["fwStagedPolicy"], peer, proto, port)
    return "allow" if staged == "accept" else "would-block"


def check_policy(policy: Policy) -> None:
    compiled = compile_policy(policy)
    arts: dict[str, F5Artifact] = {}
    for name, hp in compiled.items():
        inbound = replace(hp, rules=tuple(r for r in hp.rules if r.direction is Direction.INBOUND))
        inbound = replace(inbound, failsafe=replace(inbound.failsafe, controller=()))
        arts[name] = render_f5(inbound, f"/Common/vs_{name}")
    ev = Evaluator(policy)
    outsiders = [ipaddress.ip_address("10.0.0.3"), ipaddress.ip_address("fd00::3")]
    endpoints = [a for w in policy.workloads for a in w.addresses] + outsiders
    for src, dst in permutations(endpoints, 2):
        if src.version != dst.version or (ev.owner(src) is not None and ev.owner(src) is ev.owner(dst)):
            continue
        for proto, port in PROBES:
            if (proto is Proto.ICMP and src.version == 6) or (proto is Proto.ICMPV6 and src.version == 4):
                continue
            side = ev.evaluate(src, dst, proto, port).inbound
            if side is None:
                owner = ev.owner(dst)
                assert owner is None or not arts[owner.name].present
                continue
            got = f5_side(arts[side.workload], src, proto, port)
            assert got == side.action, (
                f"{src}->{dst} {proto.value}/{port} at {side.workload}: f5 {got}, "
                f"evaluator {side.action} by {side.rule_id}"
            )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_f5_rendering_agrees_with_evaluator_inbound(policy: Policy) -> None:
    check_policy(policy)
