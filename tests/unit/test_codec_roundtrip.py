"""One codec for policy files and REST bodies (issue 13.1; issue 12 items 10 and 12).

* Any valid Policy round-trips through YAML, REST bodies (as JSON) and the domain unchanged,
  and a REST body wrapped in ``apiVersion``/``kind`` is a policy document the loader reads to
  the same object.
* A document, valid or mutated into something invalid, is accepted by the REST path exactly
  when the YAML path accepts it; when the REST path refuses it, every field it names is
  named by the loader too (which adds line numbers). The REST path is what the API runs:
  the codec on the raw JSON (``codec.bodies.decode``), then the draft's cross-references
  (``Policy.validate``); the Pydantic wire gate never refuses a body the codec accepts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.codec import bodies
from stockade.codec.collected import API_VERSION
from stockade.controller.services import codec
from stockade.errors import ValidationError
from stockade.model import Failsafe, Policy
from stockade.policyfile import dump_policy, load_documents
from stockade.policyfile.loader import load_sources
from tests import strategies as ps

DOC_KIND = {k: v.value for k, v in bodies.DOCUMENT_KIND.items()}
# kind -> the Policy field holding its objects
FIELD = {
    "label_key": "label_keys",
    "workload": "workloads",
    "label_group": "label_groups",
    "ip_list": "ip_lists",
    "service": "services",
    "ruleset": "rulesets",
    "deny_rule": "deny_rules",
}


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps.policy())
def test_every_valid_policy_round_trips_yaml_rest_domain(policy: Policy) -> None:
    objects = _json(codec.objects_of_policy(policy))
    assert codec.build_policy(objects) == policy
    assert load_documents(dump_policy(policy), "p.yaml") == policy
    assert dump_policy(codec.build_policy(objects)) == dump_policy(policy)
    # a REST body is a policy document without its envelope: the loader reads it to the same object
    docs = []
    for kind, named in objects.items():
        for body in named.values():
            doc = {k: v for k, v in body.items() if not (kind == "failsafe" and k == "name")}
            docs.append(json.dumps({"apiVersion": API_VERSION, "kind": DOC_KIND[kind], **doc}))
    assert load_documents("---\n" + "\n---\n".join(docs), "rest.yaml") == policy


# ---- acceptance: one rule for both paths ----------------------------------------------------

NASTY: tuple[Any, ...] = (
    None, True, False, 0, 443, -1, 1.5, "", "all", "x y", "web", "prod", "nosuch", "eth0", "eth0@if12",
    "0.0.0.0", "::", "255.255.255.255", "224.0.0.1", "127.0.0.1", "fe80::1", "10.0.0.300", "10.0.0.1/24",
    "10.0.0.0/24", "10.70.0.99", "fd70::99", "443", "443/tcp", "80-70/tcp", "icmp:echo-request",
    "icmpv6:echo-request", "icmp:bogus", "full", "global", "a" * 1100,
    [], ["all"], ["web"], ["10.0.0.1"], [{}], [{"all": True}], [{"labels": {"role": "web"}}],
    {}, {"all": True}, {"all": False}, {"exclude": {"role": "web"}}, {"exclude": {"role": ["web", "db"]}},
    {"labels": {}}, {"ip_list": "office"}, {"labels": {"role": "web"}, "ip_list": "low"},
    {"labels": {"role": "web"}, "exclude": {"role": "web"}}, {"role": "web"}, {"nokey": "x"},
)
FRESH_NAMES = ("fresh-1", "fresh-2")


def _paths(x: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here]
    if isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, (*here, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out += _paths(v, (*here, i))
    return out


def _get(x: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        x = x[p]
    return x


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Policy, str, str, Any]:
    """A policy, one of its objects (kind, name) and that object's REST body, mutated 0-3 times."""
    policy = draw(ps.policy())
    objects = _json(codec.objects_of_policy(policy))
    objects.setdefault("failsafe", {"default": bodies.failsafe_body(Failsafe())})
    kind = draw(st.sampled_from(sorted(k for k in objects if objects[k])))
    name = draw(st.sampled_from(sorted(objects[kind])))
    doc = objects[kind][name]
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        target = _get(doc, path)
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "name"]))
        if action == "name" and kind not in ("failsafe", "label_key"):  # the loader always declares role, app...
            doc["name"] = draw(st.sampled_from(FRESH_NAMES))
        elif action == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(["bogus", "all", "exclude", "labels", "ip_list"]))] = draw(
                st.sampled_from(NASTY))
        elif action == "delete" and path and not (kind == "label_key" and path == ("name",)):
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        elif action == "replace" and path and not (kind == "label_key" and path == ("name",)):
            _get(doc, path[:-1])[path[-1]] = draw(st.sampled_from(NASTY))
    return policy, kind, name, doc


def _without(policy: Policy, kind: str, name: str) -> Policy:
    if kind == "failsafe":
        return replace(policy, failsafe=Failsafe())
    field = FIELD[kind]
    return replace(policy, **{field: tuple(x for x in getattr(policy, field) if x.name != name)})


def _with(policy: Policy, kind: str, obj: Any) -> Policy:
    if kind == "failsafe":
        return replace(policy, failsafe=obj)
    field = FIELD[kind]
    return replace(policy, **{field: tuple(sorted((*getattr(policy, field), obj), key=lambda x: x.name))})


def _rest(policy: Policy, kind: str, name: str, doc: Any) -> tuple[bool, set[str]]:
    """What the API does with the body: decode it (the codec), then check the draft's references."""
    try:
        obj = bodies.decode(kind, doc)
    except ValidationError as exc:
        return False, {i.field for i in exc.issues}
    gate = codec.KIND_BY_NAME[kind].body
    gate.model_validate(doc)  # the wire gate lets through whatever the codec accepts
    issues = _with(_without(policy, kind, name), kind, obj).validate("api")
    return not issues, set()


def _yaml(policy: Policy, kind: str, name: str, doc: Any) -> tuple[bool, set[str]]:
    rest = dump_policy(_without(policy, kind, name))
    body = doc
    if kind == "failsafe" and isinstance(doc, dict) and doc.get("name") == "default":
        body = {k: v for k, v in doc.items() if k != "name"}
    envelope: Any = {"apiVersion": API_VERSION, "kind": DOC_KIND[kind], **body} if isinstance(body, dict) else body
    try:
        load_sources([("rest.yaml", rest), ("mutated.yaml", json.dumps(envelope))])
    except ValidationError as exc:
        return False, {i.field for i in exc.issues if i.source == "mutated.yaml"}
    return True, set()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_a_document_is_accepted_by_rest_exactly_when_yaml_accepts_it(case: tuple[Policy, str, str, Any]) -> None:
    policy, kind, name, doc = case
    rest_ok, rest_fields = _rest(policy, kind, name, doc)
    yaml_ok, yaml_fields = _yaml(policy, kind, name, doc)
    assert rest_ok == yaml_ok, (kind, doc, rest_fields, yaml_fields)
    assert rest_fields <= yaml_fields, (kind, doc, rest_fields, yaml_fields)


# ---- the rules decided once (each was different on the two paths, or wrong on both) -----------

RULESET = {"name": "r", "scope": "all", "rules": [{"consumers": "all", "providers": "all", "services": ["any"]}]}


def _both(kind: str, doc: dict[str, Any]) -> tuple[tuple[bool, set[str]], tuple[bool, set[str]]]:
    policy = Policy(services=(bodies.BUILTIN_ANY,))
    return _rest(policy, kind, "", doc), _yaml(policy, kind, "", doc)


@pytest.mark.parametrize(
    ("kind", "doc", "field"),
    [
        # issue 12.10: the API took names its own export could not re-import
        ("workload", {"name": "w", "interfaces": [{"name": "eth0@if12", "addresses": []}]}, "interfaces[0].name"),
        # issue 12.12: addresses no workload can own
        ("workload", {"name": "w", "interfaces": [{"name": "eth0", "addresses": ["0.0.0.0"]}]},
         "interfaces[0].addresses[0]"),
        ("workload", {"name": "w", "interfaces": [{"name": "eth0", "addresses": ["::"]}]},
         "interfaces[0].addresses[0]"),
        ("workload", {"name": "w", "interfaces": [{"name": "eth0", "addresses": ["255.255.255.255"]}]},
         "interfaces[0].addresses[0]"),
        ("workload", {"name": "w", "interfaces": [{"name": "eth0", "addresses": ["ff02::1"]}]},
         "interfaces[0].addresses[0]"),
        ("workload", {"name": "w", "labels": {"env": 2024}}, "labels.env"),
        ("ruleset", {**RULESET, "scope": None}, "scope"),
        ("ruleset", {k: v for k, v in RULESET.items() if k != "scope"}, "scope"),
        ("ruleset", {**RULESET, "scope": [{}]}, "scope[0]"),
        ("ruleset", {**RULESET, "scope": []}, "scope"),  # issue 14: only "all" means every workload
        ("ruleset", {**RULESET, "scope": [{"all": True}]}, "scope[0].all"),
        ("service", {"name": "s", "ports": ["icmp:echo-requets"]}, "ports[0]"),
        ("service", {"name": "s", "ports": [443]}, "ports[0]"),
        ("ip_list", {"name": "i", "include": ["10.0.0.1/24"]}, "include[0]"),
    ],
)
def test_both_paths_refuse_with_the_same_field(kind: str, doc: dict[str, Any], field: str) -> None:
    (rest_ok, rest_fields), (yaml_ok, yaml_fields) = _both(kind, doc)
    assert not rest_ok and not yaml_ok
    assert rest_fields == yaml_fields == {field}


@pytest.mark.parametrize(
    ("kind", "doc"),
    [
        # an exclude-only selector: every workload except bastions (never wider than "all")
        ("ruleset", {**RULESET, "scope": [{"exclude": {"role": "web"}}]}),
        ("deny_rule", {"name": "d", "consumers": [{"exclude": {"role": ["web", "db"]}}], "providers": "all",
                       "services": ["any"]}),
        ("service", {"name": "s", "ports": ["icmp:echo-request", "icmpv6:echo-request"]}),
        ("workload", {"name": "w", "interfaces": [{"name": "eth0.100", "addresses": ["10.0.0.1", "fd00::1"]}]}),
    ],
)
def test_both_paths_accept(kind: str, doc: dict[str, Any]) -> None:
    (rest_ok, rest_fields), (yaml_ok, yaml_fields) = _both(kind, doc)
    assert rest_ok and yaml_ok, (rest_fields, yaml_fields)


def test_named_icmp_types_are_stored_as_numbers() -> None:
    svc = bodies.decode("service", {"name": "s", "ports": ["icmpv6:echo-request", "icmp:echo-reply"]})
    assert bodies.encode("service", svc)["ports"] == ["icmp:0", "icmpv6:128"]
