"""Policy as code: loading the example estate, dump determinism, round trips, in-memory text."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from stockade.errors import ValidationError
from stockade.model import (
    ALL_WORKLOADS,
    ConsumerScope,
    EnforcementMode,
    IPListSelector,
    Label,
    LabelSelector,
    Policy,
    Proto,
    ServiceEntry,
)
from stockade.policyfile import dump_policy, load_documents, load_policy
from stockade.policyfile.loader import BUILTIN_ANY, policy_files
from tests.unit import policy_strategies as ps

ESTATE = Path(__file__).resolve().parents[2] / "examples" / "estate"
LAB_V4 = ipaddress.ip_network("10.70.0.0/24")
LAB_V6 = ipaddress.ip_network("fd70::/64")


@pytest.fixture(scope="module")
def estate() -> Policy:
    return load_policy(ESTATE)


def _doc(body: str) -> str:
    return "apiVersion: stockade.io/v1\n" + textwrap.dedent(body).lstrip("\n")


# ---- the example estate ----------------------------------------------------------

def test_example_counts(estate: Policy) -> None:
    assert [w.name for w in estate.workloads] == [
        "app-dev-1", "app-prod-1", "db-dev-1", "db-prod-1", "mon-1", "web-dev-1", "web-prod-1", "web-prod-2",
    ]
    assert {s.name for s in estate.services} == {
        "any", "app-http", "https", "node-exporter", "ping", "postgres", "smb",
    }
    assert [r.name for r in estate.rulesets] == ["monitoring", "shop-dev", "shop-prod"]
    assert sum(len(r.rules) for r in estate.rulesets) == 8
    assert [d.name for d in estate.deny_rules] == ["no-smb", "non-prod-to-prod"]
    assert [i.name for i in estate.ip_lists] == ["anywhere", "office"]
    assert [g.name for g in estate.label_groups] == ["non-prod"]
    assert estate.validate() == []


def test_example_files_are_split_by_kind() -> None:
    names = [p.name for p in policy_files(ESTATE)]
    assert names == sorted(names)
    for wanted in ("labels.yaml", "services.yaml", "iplists.yaml", "workloads.yaml", "rulesets.yaml", "deny.yaml"):
        assert wanted in names


def test_example_addresses_fit_the_lab_bridge(estate: Policy) -> None:
    for w in estate.workloads:
        versions = sorted(a.version for a in w.addresses)
        assert versions == [4, 6], w.name
        for a in w.addresses:
            assert a in (LAB_V4 if a.version == 4 else LAB_V6), (w.name, a)
    office = estate.ip_list_map()["office"].ranges()
    assert office.contains(ipaddress.ip_address("10.70.0.200"))
    assert office.contains(ipaddress.ip_address("fd70::c8"))
    assert not office.contains(ipaddress.ip_address("10.70.0.254"))
    assert not any(office.contains(a) for w in estate.workloads for a in w.addresses)


def test_example_modes_and_labels(estate: Policy) -> None:
    wl = estate.workload_map()
    for w in estate.workloads:
        if w.name == "mon-1":
            assert w.mode is EnforcementMode.VISIBILITY
            assert w.label("role") == "monitoring"
        elif w.label("env") == "prod":
            assert w.mode is EnforcementMode.FULL
        else:
            assert (w.label("env"), w.mode) == ("dev", EnforcementMode.SELECTIVE)
        assert w.backend is None  # unset: the agent's own --backend
    assert wl["db-prod-1"].labels == frozenset(
        {Label("role", "db"), Label("app", "shop"), Label("env", "prod"), Label("loc", "lab")}
    )
    env = {k.name: k for k in estate.label_keys}["env"]
    assert env.allowed == frozenset({"prod", "dev", "test"})


def test_example_policy_semantics(estate: Policy) -> None:
    services = estate.service_map()
    assert services["node-exporter"].matches(Proto.TCP, 9100)
    assert services["ping"].entries == (ServiceEntry(Proto.ICMP, 8, 8), ServiceEntry(Proto.ICMPV6, 128, 128))
    assert services["any"] == BUILTIN_ANY
    (monitor,) = {r.name: r for r in estate.rulesets}["monitoring"].rules
    assert monitor.consumers_scope is ConsumerScope.GLOBAL
    assert monitor.consumers == (LabelSelector((Label("role", "monitoring"),)),)
    assert monitor.providers == (ALL_WORKLOADS,)
    denies = {d.name: d for d in estate.deny_rules}
    assert denies["no-smb"].override and denies["no-smb"].services == ("smb",)
    assert IPListSelector("anywhere") in denies["no-smb"].consumers
    boundary = denies["non-prod-to-prod"]
    assert not boundary.override
    assert boundary.consumers == (LabelSelector(groups=("non-prod",)),)
    shop_prod = {r.name: r for r in estate.rulesets}["shop-prod"]
    crossing = [r for r in shop_prod.rules if r.consumers_scope is ConsumerScope.GLOBAL]
    assert len(crossing) == 1 and Label("env", "dev") in crossing[0].consumers[0].require  # type: ignore[union-attr]
    assert estate.failsafe.management == (ServiceEntry(Proto.TCP, 22, 22),)
    assert estate.failsafe.controller == (
        ipaddress.ip_network("10.70.0.1/32"),
        ipaddress.ip_network("fd70::1/128"),
    )


# ---- dump: round trip and determinism ---------------------------------------------

def test_round_trip_of_the_example(estate: Policy) -> None:
    text = dump_policy(estate)
    again = load_documents(text, "dumped.yaml")
    assert again == estate
    assert dump_policy(again) == text


def test_round_trip_through_a_file(estate: Policy, tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    out.write_text(dump_policy(estate), encoding="utf-8")
    assert load_policy(out) == estate


_DUMP_SCRIPT = (
    "import sys; from stockade.policyfile import load_policy, dump_policy; "
    "sys.stdout.write(dump_policy(load_policy(sys.argv[1])))"
)


def test_dump_is_identical_across_hash_seeds() -> None:
    outputs = set()
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _DUMP_SCRIPT, str(ESTATE)], env=env, capture_output=True, check=True
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1
    assert outputs.pop().decode() == dump_policy(load_policy(ESTATE))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ps.policy())
def test_round_trip_of_random_policies(policy: Policy) -> None:
    expected = replace(policy, services=tuple(sorted((*policy.services, BUILTIN_ANY), key=lambda s: s.name)))
    text = dump_policy(policy)
    loaded = load_documents(text, "random.yaml")
    assert loaded == expected
    assert dump_policy(loaded) == text


# ---- loading details ---------------------------------------------------------------

def test_directory_is_read_recursively_in_sorted_order_skipping_hidden(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "svc.yml").write_text(_doc("kind: Service\nname: ssh\nports: [22/tcp]\n"))
    (tmp_path / "a.yaml").write_text(_doc("kind: Service\nname: ssh\nports: [2222/tcp]\n"))
    (tmp_path / ".git" / "junk.yaml").write_text("{{{ not yaml")
    (tmp_path / "README.md").write_text("kind: nonsense\n")
    with pytest.raises(ValidationError) as info:
        load_policy(tmp_path)
    (issue,) = info.value.issues  # a.yaml sorts first, so the duplicate is in b/svc.yml
    assert issue.source == str(tmp_path / "b" / "svc.yml") and issue.line == 3


def test_load_documents_reads_in_memory_text() -> None:
    text = _doc(
        """
        kind: Service
        name: dns
        ports: [53/udp, 53/tcp]
        ---
        apiVersion: stockade.io/v1
        kind: Workload
        name: ns-1
        labels: {role: dns}
        interfaces: [{name: eth0, addresses: [192.0.2.53, 2001:db8::53]}]
        """
    )
    policy = load_documents(text, "import")
    assert policy.service_map()["dns"].matches(Proto.UDP, 53)
    (ns,) = policy.workloads
    assert ns.mode is EnforcementMode.VISIBILITY and ns.backend is None
    with pytest.raises(ValidationError) as info:
        load_documents(text.replace("53/udp", "53/udpp"), "import")
    assert str(info.value).startswith("import:4: ports[0]: ")


def test_user_defined_any_replaces_the_builtin_and_label_key_values_are_enforced() -> None:
    text = _doc(
        """
        kind: Service
        name: any
        ports: [tcp, udp]
        ---
        apiVersion: stockade.io/v1
        kind: LabelKey
        name: tier
        values: [front, back]
        ---
        apiVersion: stockade.io/v1
        kind: Workload
        name: w1
        labels: {tier: front}
        """
    )
    policy = load_documents(text, "t")
    assert policy.service_map()["any"].entries == (ServiceEntry(Proto.TCP), ServiceEntry(Proto.UDP))
    assert "tier" in {k.name for k in policy.label_keys}
    with pytest.raises(ValidationError, match="label value tier=middle is not allowed"):
        load_documents(text.replace("{tier: front}", "{tier: middle}"), "t")


def test_selector_forms_round_trip() -> None:
    text = _doc(
        """
        kind: LabelGroup
        name: fronts
        key: role
        values: [web, lb]
        ---
        apiVersion: stockade.io/v1
        kind: DenyRule
        name: d
        consumers:
          - labels: {env: prod}
            exclude: {role: [bastion, jump]}
            label_groups: [fronts]
          - exclude: {env: dev}
        providers: [all]
        services: [any]
        """
    )
    policy = load_documents(text, "t")
    (deny,) = policy.deny_rules
    assert deny.consumers[0] == LabelSelector(
        (Label("env", "prod"),), ("fronts",), (Label("role", "bastion"), Label("role", "jump"))
    )
    assert deny.providers == (ALL_WORKLOADS,)
    assert load_documents(dump_policy(policy), "again") == policy


def test_empty_documents_and_bom_are_accepted() -> None:
    text = "\ufeff---\n" + _doc("kind: Service\nname: ssh\nports: [22/tcp]\n") + "---\n"
    assert [s.name for s in load_documents(text, "t").services] == ["any", "ssh"]


@pytest.mark.parametrize(
    "text",
    [
        "[" * 5000,
        "a: " + "[" * 3000 + "]" * 3000,
        "- " * 2000 + "x",
        "&a [*a]",
        "kind: !!python/object:os.system {}",
        "\x00\x01",
        "? [a, b]\n: c\n",
        "apiVersion: stockade.io/v1\nkind: [Workload]\n",
        "apiVersion: stockade.io/v1\nkind: Workload\nname: {a: 1}\ninterfaces: 7\n",
        "apiVersion: stockade.io/v1\nkind: Ruleset\nname: r\nscope: [all]\nrules: [[], 3, {consumers: 1}]\n",
        "apiVersion: stockade.io/v1\nkind: Service\nname: s\nports: ['99999999999999999999999/tcp']\n",
    ],
)
def test_hostile_text_gives_validation_errors_only(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_documents(text, "hostile")
    assert all(i.source == "hostile" and i.line > 0 for i in info.value.issues)
