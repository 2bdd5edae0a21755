"""Policy suggestions, proven at the evaluator: accepted suggestions allow exactly what was observed.

The traffic is the example estate's: every probe of a vocabulary (every managed address, an
office client, unmanaged peers; every service port plus ports nobody uses; TCP, UDP, ICMP,
ICMPv6) that the estate's policy allows in full mode. Suggestions are made from that traffic
for every app group against a draft with no rules at all, accepted, and then every probe of
the vocabulary is evaluated again in full mode: allowed exactly when it was observed.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import replace

import pytest

from stockade.errors import NotFoundError, ValidationError
from stockade.evaluator import Evaluator, Verdict
from stockade.model import (
    EnforcementMode,
    IPAddress,
    IPList,
    IPListSelector,
    Label,
    LabelSelector,
    Policy,
    Proto,
    Ruleset,
    Service,
)
from stockade.model.rules import ConsumerScope
from stockade.paths import example_estate
from stockade.policyfile import load_policy
from stockade.visibility import Connection, FlowKey, accept, suggest, with_accepted
from stockade.visibility.appmap import group_values

ip = ipaddress.ip_address
UNMANAGED = [ip("10.70.0.200"), ip("fd70::c8"), ip("10.70.0.201"), ip("10.70.0.250"), ip("fd70::fa"),
             ip("198.51.100.7"), ip("2001:db8::7")]
TCP_PORTS = (22, 80, 443, 445, 5432, 8080, 9100, 12345)
UDP_PORTS = (53, 443, 5432)

Probe = tuple[IPAddress, IPAddress, Proto, int]


def full(policy: Policy) -> Policy:
    return replace(policy, workloads=tuple(replace(w, mode=EnforcementMode.FULL) for w in policy.workloads))


def vocabulary(policy: Policy) -> list[Probe]:
    addrs = [a for w in policy.workloads for a in w.addresses] + UNMANAGED
    out: list[Probe] = []
    for src, dst in itertools.permutations(addrs, 2):
        if src.version != dst.version:
            continue
        out += [(src, dst, Proto.TCP, p) for p in TCP_PORTS]
        out += [(src, dst, Proto.UDP, p) for p in UDP_PORTS]
        out.append((src, dst, Proto.ICMP, 8) if src.version == 4 else (src, dst, Proto.ICMPV6, 128))
    return out


def allowed(ev: Evaluator, p: Probe) -> bool:
    return ev.evaluate(*p).verdict is Verdict.ALLOWED


@pytest.fixture(scope="module")
def estate() -> Policy:
    return load_policy(example_estate())


@pytest.fixture(scope="module")
def observed(estate: Policy) -> list[Connection]:
    ev = Evaluator(full(estate))
    return [Connection(FlowKey(*p), Verdict.ALLOWED, 1, 1.0, 2.0) for p in vocabulary(estate) if allowed(ev, p)]


def groups(policy: Policy) -> list[tuple[Label, ...]]:
    found = {group_values(w.labels, ("app", "env")) for w in policy.workloads}
    return [tuple(Label(k, v) for k, v in zip(("app", "env"), g, strict=True)) for g in sorted(found)]


def test_accepted_suggestions_allow_exactly_the_observed_flows(estate: Policy, observed: list[Connection]) -> None:
    draft = replace(estate, rulesets=(), deny_rules=())  # inventory, services and IP lists only
    for g in groups(estate):
        draft = with_accepted(draft, accept(suggest(draft, observed, g)))
    assert draft.validate() == []
    seen = {(c.key.src, c.key.dst, c.key.proto, c.key.port) for c in observed}
    after = Evaluator(full(draft))
    vocab = vocabulary(estate)
    wrong = [p for p in vocab if allowed(after, p) != (p in seen)]
    assert wrong == []
    assert len(seen) > 200 and len(vocab) - len(seen) > 2000  # both sides of the claim are exercised
    # label level: a handful of rules per group, not one per observed flow
    assert sum(len(rs.rules) for rs in draft.rulesets) <= 16


def test_suggestions_for_the_production_shop(estate: Policy, observed: list[Connection]) -> None:
    draft = replace(estate, rulesets=(), deny_rules=())
    s = suggest(draft, observed, (Label("app", "shop"), Label("env", "prod")))
    assert s.group == "group:app=shop,env=prod"
    assert s.scope == LabelSelector(require=(Label("app", "shop"), Label("env", "prod")))
    assert s.ruleset == "sugg-shop-prod"
    rules = {(r.service, r.consumers_scope): r for r in s.rules}
    web_app = rules[("app-http", ConsumerScope.INTRA)]  # an existing service with exactly 8080/tcp
    assert web_app.consumers == (LabelSelector(require=(Label("role", "web"),)),)
    assert web_app.providers == (LabelSelector(require=(Label("role", "app"),)),)
    assert web_app.connections == 2 * 2  # two web servers, v4 and v6
    https = [r for r in s.rules if r.service == "https"]
    assert {r.consumers_scope for r in https} == {ConsumerScope.INTRA, ConsumerScope.GLOBAL}
    office = next(r for r in https if r.consumers_scope is ConsumerScope.INTRA)
    assert office.consumers == (IPListSelector("office"),)  # an existing list holding no workload
    dev = next(r for r in https if r.consumers_scope is ConsumerScope.GLOBAL)
    assert dev.consumers == (LabelSelector(require=(Label("app", "shop"), Label("env", "dev"), Label("role", "web"))),)
    monitoring = [r for r in s.rules if any(Label("role", "monitoring") in getattr(c, "require", ())
                                            for c in r.consumers)]
    assert len(monitoring) == 1 and len(monitoring[0].providers) == 3  # web | app | db on one service
    assert {str(e) for e in monitoring[0].entries} == {"9100/tcp", "8/icmp", "128/icmpv6"}
    assert monitoring[0].service in {x.name for x in s.services}
    # shop/prod talks to no other group as a client: nothing elsewhere
    assert s.elsewhere == ()
    assert sum(r.connections for r in s.rules) == s.considered - s.already_allowed


def test_already_allowed_flows_are_skipped_and_failsafe_never_suggested(estate: Policy,
                                                                        observed: list[Connection]) -> None:
    s = suggest(estate, observed, (Label("app", "shop"), Label("env", "prod")))
    assert s.rules == () and s.already_allowed == s.considered > 0
    forced = suggest(estate, observed, (Label("app", "shop"), Label("env", "prod")), include_allowed=True)
    assert forced.rules
    assert forced.ruleset == "sugg-shop-prod"


def test_unmanaged_peers_get_a_new_ip_list_and_elsewhere_is_reported(estate: Policy) -> None:
    draft = replace(estate, rulesets=(), deny_rules=())
    w, a, d = ip("10.70.0.111"), ip("10.70.0.121"), ip("10.70.0.11")
    conns = [
        Connection(FlowKey(ip("198.51.100.7"), w, Proto.TCP, 443), Verdict.POTENTIALLY_BLOCKED, 3, 1, 2),
        Connection(FlowKey(ip("198.51.100.9"), w, Proto.TCP, 443), Verdict.POTENTIALLY_BLOCKED, 1, 1, 2),
        Connection(FlowKey(a, ip("203.0.113.5"), Proto.UDP, 53), Verdict.ALLOWED, 7, 1, 2),
        Connection(FlowKey(w, d, Proto.TCP, 443), Verdict.ALLOWED, 1, 1, 2),  # dev web -> prod web
    ]
    s = suggest(draft, conns, (Label("app", "shop"), Label("env", "dev")))
    assert s.elsewhere[0].group == "group:app=shop,env=prod" and s.elsewhere[0].connections == 1
    assert len(s.ip_lists) == 2  # "anywhere" holds managed addresses: not reused
    inbound = next(r for r in s.rules if r.service == "https")
    (peers,) = inbound.consumers
    assert isinstance(peers, IPListSelector)
    new = {x.name: x for x in s.ip_lists}[peers.ip_list]
    assert {str(n) for n in new.include} == {"198.51.100.7/32", "198.51.100.9/32"}
    assert inbound.connections == 2 and inbound.count == 4
    dns = next(r for r in s.rules if r.service not in ("https",))
    assert dns.consumers == (LabelSelector(require=(Label("role", "app"),)),)
    assert {str(e) for e in dns.entries} == {"53/udp"}
    # accepting one rule brings only the objects it needs
    acc = accept(s, [inbound.id])
    assert [x.name for x in acc.ip_lists] == [peers.ip_list] and acc.services == ()
    with pytest.raises(NotFoundError):
        accept(s, ["nosuchrule"])


def test_workloads_without_a_role_are_matched_by_exclusion(estate: Policy) -> None:
    draft = replace(estate, rulesets=(), deny_rules=(), workloads=tuple(
        replace(w, labels=frozenset(x for x in w.labels if x.key != "role")) if w.name == "db-prod-1" else w
        for w in estate.workloads))
    conns = [Connection(FlowKey(ip("10.70.0.21"), ip("10.70.0.31"), Proto.TCP, 5432), Verdict.ALLOWED, 1, 1, 2)]
    s = suggest(draft, conns, (Label("app", "shop"), Label("env", "prod")))
    (rule,) = s.rules
    (prov,) = rule.providers
    assert isinstance(prov, LabelSelector) and not prov.require
    assert {x.value for x in prov.exclude} == {"web", "app", "db", "monitoring"}
    after = Evaluator(full(with_accepted(draft, accept(s))))
    assert after.evaluate(ip("10.70.0.21"), ip("10.70.0.31"), Proto.TCP, 5432).verdict is Verdict.ALLOWED
    assert after.evaluate(ip("10.70.0.21"), ip("10.70.0.11"), Proto.TCP, 5432).verdict is Verdict.BLOCKED


def test_names_do_not_clash_and_bad_groups_are_refused(estate: Policy) -> None:
    mine = Ruleset("sugg-shop-prod", (), ())
    taken = replace(estate, ip_lists=(*estate.ip_lists, IPList("sugg-x", (ipaddress.ip_network("192.0.2.0/24"),))),
                    rulesets=(*estate.rulesets, mine), services=(*estate.services, Service("sugg-6000-tcp", ())))
    conns = [Connection(FlowKey(ip("10.70.0.21"), ip("10.70.0.31"), Proto.TCP, 6000), Verdict.ALLOWED, 1, 1, 2)]
    s = suggest(taken, conns, (Label("app", "shop"), Label("env", "prod")))
    assert s.services[0].name == "sugg-6000-tcp-2"
    assert s.ruleset == "sugg-shop-prod-2"
    with pytest.raises(ValidationError):
        suggest(taken, conns, (Label("role", "db"),))
    with pytest.raises(NotFoundError):
        suggest(taken, conns, (Label("app", "nosuch"), Label("env", "prod")))
