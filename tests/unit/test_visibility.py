"""Visibility core: merging both sides' reports, resolution, the application map and impact preview."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from stockade.compiler.ir import Direction
from stockade.evaluator import Evaluator, Verdict
from stockade.model import EnforcementMode, Label, Policy, Proto
from stockade.paths import example_estate
from stockade.policyfile import load_policy
from stockade.visibility import (
    ChangeKind,
    Connection,
    EndpointKind,
    FlowKey,
    FlowRecord,
    NodeKind,
    Resolver,
    build_app_map,
    edge_connections,
    explain,
    merge_sides,
    preview,
)

ip = ipaddress.ip_address
WEB1, WEB2, APP1, DB1 = ip("10.70.0.11"), ip("10.70.0.12"), ip("10.70.0.21"), ip("10.70.0.31")
WEBDEV, MON, OFFICE, STRANGER = ip("10.70.0.111"), ip("10.70.0.50"), ip("10.70.0.200"), ip("198.51.100.7")
WEB1_6, APP1_6 = ip("fd70::11"), ip("fd70::21")


@pytest.fixture(scope="module")
def estate() -> Policy:
    return load_policy(example_estate())


def rec(src: object, dst: object, port: int, side: Direction, verdict: Verdict, *, count: int = 1,
        t: float = 100.0, rule: str = "r", proto: Proto = Proto.TCP) -> FlowRecord:
    key = FlowKey(ip(str(src)), ip(str(dst)), proto, port)
    return FlowRecord(key, side, verdict, rule, count, t, t + 1)


def conn(src: object, dst: object, port: int | None, proto: Proto = Proto.TCP, *, count: int = 1,
         verdict: Verdict = Verdict.ALLOWED) -> Connection:
    return Connection(FlowKey(ip(str(src)), ip(str(dst)), proto, port), verdict, count, 1.0, 2.0)


# ---- merging --------------------------------------------------------------------------------


def test_merge_takes_the_worst_verdict_and_counts_a_connection_once() -> None:
    out = rec(WEB1, APP1, 8080, Direction.OUTBOUND, Verdict.ALLOWED, count=5, t=10, rule="ruleset/a/0")
    inn = rec(WEB1, APP1, 8080, Direction.INBOUND, Verdict.BLOCKED, count=5, t=12, rule="default")
    later = rec(WEB1, APP1, 8080, Direction.OUTBOUND, Verdict.ALLOWED, count=2, t=50, rule="ruleset/a/0")
    other = rec(WEB1, DB1, 5432, Direction.OUTBOUND, Verdict.POTENTIALLY_BLOCKED, count=1, rule="default")
    merged = merge_sides([later, inn, other, out])
    assert [c.key.dst for c in merged] == [APP1, DB1]
    a = merged[0]
    assert a.verdict is Verdict.BLOCKED
    assert a.count == 7  # outbound saw 5 + 2, inbound 5: the larger side
    assert (a.first_seen, a.last_seen) == (10, 51)
    assert (a.outbound_rule, a.inbound_rule) == ("ruleset/a/0", "default")
    assert merged[1].verdict is Verdict.POTENTIALLY_BLOCKED
    assert merged[1].inbound_rule is None


def test_merge_keeps_the_rule_of_the_most_severe_report_per_side() -> None:
    a = rec(WEB1, APP1, 80, Direction.INBOUND, Verdict.ALLOWED, rule="ruleset/x/0")
    b = rec(WEB1, APP1, 80, Direction.INBOUND, Verdict.BLOCKED, rule="deny/y")
    c = rec(WEB1, APP1, 80, Direction.INBOUND, Verdict.ALLOWED, rule="ruleset/x/1")
    (m,) = merge_sides([a, b, c])
    assert m.inbound_rule == "deny/y" and m.verdict is Verdict.BLOCKED and m.count == 3


def test_mixed_families_sort_and_service_text() -> None:
    merged = merge_sides([rec(WEB1_6, APP1_6, 443, Direction.OUTBOUND, Verdict.ALLOWED),
                          rec(WEB1, APP1, 443, Direction.OUTBOUND, Verdict.ALLOWED),
                          rec(WEB1, APP1, 8, Direction.OUTBOUND, Verdict.ALLOWED, proto=Proto.ICMP)])
    assert [c.key.src.version for c in merged] == [4, 4, 6]
    assert [c.key.service_text() for c in merged] == ["443/tcp", "icmp:8", "443/tcp"]


# ---- resolution -----------------------------------------------------------------------------


def test_resolver_prefers_workloads_then_the_most_specific_ip_list(estate: Policy) -> None:
    r = Resolver(estate)
    web = r.endpoint(WEB1)
    assert web.kind is EndpointKind.WORKLOAD and web.workload == "web-prod-1"
    assert Label("role", "web") in web.labels
    office = r.endpoint(OFFICE)  # in both "office" and "anywhere": office is smaller
    assert (office.kind, office.name) == (EndpointKind.IP_LIST, "office")
    assert r.endpoint(ip("10.70.0.254")).name == "anywhere"  # excluded from office
    bare = Resolver(replace(estate, ip_lists=()))
    assert bare.endpoint(STRANGER).kind is EndpointKind.INTERNET


# ---- the map --------------------------------------------------------------------------------


def test_app_map_groups_by_app_and_env(estate: Policy) -> None:
    conns = [
        conn(WEB1, APP1, 8080, count=3), conn(WEB2, APP1, 8080, count=4),
        conn(APP1, DB1, 5432, verdict=Verdict.POTENTIALLY_BLOCKED),
        conn(OFFICE, WEB1, 443), conn(STRANGER, WEB1, 443, verdict=Verdict.BLOCKED),
        conn(MON, WEB1, 9100), conn(MON, WEB1, 8, Proto.ICMP), conn(WEBDEV, WEB1, 443),
    ]
    m = build_app_map(estate, conns)
    ids = {n.id for n in m.nodes}
    assert {"group:app=shop,env=prod", "group:app=shop,env=dev", "group:app=ops,env=prod",
            "iplist:office", "iplist:anywhere"} == ids
    prod = m.node("group:app=shop,env=prod")
    assert prod.kind is NodeKind.APP_GROUP and prod.name == "shop/prod"
    assert prod.workloads == ("app-prod-1", "db-prod-1", "web-prod-1", "web-prod-2")
    edges = {(e.src, e.dst): e for e in m.edges}
    self_edge = edges[("group:app=shop,env=prod", "group:app=shop,env=prod")]
    assert self_edge.connections == 3 and self_edge.count == 8
    assert (self_edge.mix.allowed, self_edge.mix.potentially_blocked, self_edge.mix.blocked) == (2, 1, 0)
    assert self_edge.services == ("5432/tcp", "8080/tcp")
    mon = edges[("group:app=ops,env=prod", "group:app=shop,env=prod")]
    assert mon.services == ("9100/tcp", "icmp:8")
    assert edges[("iplist:anywhere", "group:app=shop,env=prod")].mix.blocked == 1
    # drill-down: the edge's connections and the rule that decides each
    behind = edge_connections(estate, conns, "group:app=ops,env=prod", "group:app=shop,env=prod")
    assert {c.key.port for c in behind} == {9100, 8}
    (office,) = explain(estate, [conns[3]])
    assert office.src.name == "office" and office.dst.workload == "web-prod-1"
    assert office.evaluation.inbound is not None and office.evaluation.inbound.rule_id == "ruleset/shop-prod/0"


def test_app_map_with_other_keys_and_empty_values(estate: Policy) -> None:
    m = build_app_map(estate, [conn(WEB1, APP1, 8080)], keys=("role",))
    assert {n.name for n in m.nodes if n.kind is NodeKind.APP_GROUP} == {"web", "app", "db", "monitoring"}
    stripped = replace(estate, workloads=tuple(
        replace(w, labels=frozenset(x for x in w.labels if x.key != "env")) for w in estate.workloads))
    m2 = build_app_map(stripped, [])
    assert "group:app=shop,env=" in {n.id for n in m2.nodes}
    assert m2.edges == ()


# ---- impact ---------------------------------------------------------------------------------


def test_impact_lists_exactly_what_the_evaluator_says_changes(estate: Policy) -> None:
    # the draft drops the web -> app rule of shop-prod and puts db-prod-1 in visibility mode
    shop = next(rs for rs in estate.rulesets if rs.name == "shop-prod")
    draft_rs = replace(shop, rules=tuple(r for i, r in enumerate(shop.rules) if i != 1))
    draft = replace(estate, rulesets=tuple(draft_rs if rs.name == "shop-prod" else rs for rs in estate.rulesets))
    conns = [conn(WEB1, APP1, 8080, count=9), conn(WEB2, APP1, 8080, count=2), conn(APP1, DB1, 5432),
             conn(OFFICE, WEB1, 443), conn(WEB1_6, APP1_6, 8080), conn(STRANGER, WEB1, 443)]
    imp = preview(estate, draft, conns)
    assert imp.evaluated == len(conns)
    before, after = Evaluator(estate), Evaluator(draft)
    expected = {c.key for c in conns
                if before.evaluate(c.key.src, c.key.dst, c.key.proto, c.key.port).verdict is not Verdict.BLOCKED
                and after.evaluate(c.key.src, c.key.dst, c.key.proto, c.key.port).verdict is Verdict.BLOCKED}
    assert expected == {conns[0].key, conns[1].key, conns[4].key}  # web -> app, v4 and v6
    assert {i.connection.key for i in imp.items} == expected
    assert imp.newly_blocked == 3
    assert imp.items[0].connection.count == 9  # most seen first within a kind
    assert all(i.before.inbound is not None and i.before.inbound.rule_id == "ruleset/shop-prod/1" for i in imp.items)


def test_impact_orders_newly_blocked_first(estate: Policy) -> None:
    loud = replace(estate, workloads=tuple(
        replace(w, mode=EnforcementMode.VISIBILITY) if w.name == "db-prod-1" else w for w in estate.workloads))
    shop = next(rs for rs in estate.rulesets if rs.name == "shop-prod")
    cut = replace(shop, rules=shop.rules[2:])  # no office -> web, no web -> app
    draft = replace(loud, rulesets=tuple(cut if rs.name == "shop-prod" else rs for rs in loud.rulesets))
    conns = [conn(MON, DB1, 22), conn(STRANGER, DB1, 5432), conn(OFFICE, WEB1, 443), conn(WEB1, APP1, 8080)]
    imp = preview(estate, draft, conns)
    kinds = [i.change for i in imp.items]
    assert kinds == sorted(kinds)
    assert kinds[0] is ChangeKind.NEWLY_BLOCKED
    assert ChangeKind.NO_LONGER_BLOCKED in kinds  # stranger -> db: blocked -> potentially blocked
    assert preview(estate, estate, conns).items == ()
