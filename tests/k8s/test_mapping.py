"""Pod -> workload mapping (pure; no cluster): names, labels through the mapping, addresses, skips."""

from __future__ import annotations

from typing import Any

import pytest

from stockade.k8s.mapping import DesiredWorkload, LabelMapping, PodKey, Skip, desired_workload, workload_name
from stockade.model.labels import LabelKey, is_valid_name

KEYS = {
    "app": LabelKey("app"),
    "env": LabelKey("env", frozenset({"prod", "dev"})),
}
NS = {"env": "dev"}


def pod(labels: dict[str, Any] | None = None, ips: Any = ("10.244.1.5", "fd44:244::5"), **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "web-1", "namespace": "shop", "labels": labels or {}},
        "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]},
    }
    obj.update(extra)
    return obj


def want(obj: dict[str, Any], ns: dict[str, str] | None = NS) -> DesiredWorkload | Skip:
    return desired_workload(obj, ns, LabelMapping(), KEYS)


def test_a_pod_becomes_a_workload_with_mapped_labels_and_both_families() -> None:
    w = want(pod({"app.kubernetes.io/name": "web", "tier": "x"}))
    assert isinstance(w, DesiredWorkload)
    assert w.name == "k8s.shop.web-1"
    assert dict(w.labels) == {"app": "web", "env": "dev"}
    assert w.addresses == ("10.244.1.5", "fd44:244::5")
    assert w.body()["interfaces"] == [{"name": "eth0", "addresses": ["10.244.1.5", "fd44:244::5"]}]


def test_the_namespace_wins_over_the_pod_for_one_key() -> None:
    mapping = LabelMapping(pod=(("env", "env"),), namespace=(("env", "env"),))
    w = desired_workload(pod({"env": "prod"}), {"env": "dev"}, mapping, KEYS)
    assert isinstance(w, DesiredWorkload) and dict(w.labels) == {"env": "dev"}


@pytest.mark.parametrize(
    ("obj", "ns", "event"),
    [
        (pod(ips=()), NS, False),  # no IP yet: not a peer, nothing wrong
        (pod(), None, False),  # namespace not seen yet
        (pod({"app": "bad value!"}), NS, True),  # not a Stockade name
        (pod(), {"env": "staging"}, True),  # not allowed by the key: skip, never drop the label
        (pod(ips=("not-an-ip",)), NS, True),
        (pod(ips=("0.0.0.0",)), NS, True),
        (pod(ips=[str(i) for i in range(20)]), NS, True),
        (pod(labels={f"k{i}": "v" for i in range(300)}), NS, True),  # huge label set
        ({"metadata": "nope"}, NS, True),
        (pod(status="garbage"), NS, False),
        (pod(status={"phase": "Succeeded", "podIPs": [{"ip": "10.244.1.5"}]}), NS, False),
    ],
)
def test_skips(obj: dict[str, Any], ns: dict[str, str] | None, event: bool) -> None:
    got = want(obj, ns)
    assert isinstance(got, Skip), got
    assert got.event is event, got.reason
    if obj.get("metadata") != "nope":
        assert got.pod == PodKey("shop", "web-1")  # keyed even when malformed: its workload can be removed


def test_a_bound_pod_is_an_address_less_workload_before_its_ip() -> None:
    """Bound to a node (the node label declared): a workload at once, with no address (in no peer set);
    its IP later only adds the address. Unbound and without an IP: not a workload."""
    keys = {**KEYS, "k8s-node": LabelKey("k8s-node")}
    bound = pod({"app": "web"}, ips=(), spec={"nodeName": "node-1"})
    bound["status"] = {"phase": "Pending"}
    early = desired_workload(bound, NS, LabelMapping(), keys)
    assert isinstance(early, DesiredWorkload), early
    assert early.addresses == () and early.body()["interfaces"] == [{"name": "eth0", "addresses": []}]
    assert dict(early.labels) == {"app": "web", "env": "dev", "k8s-node": "node-1"}
    later = desired_workload({**bound, "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.5"}]}}, NS,
                             LabelMapping(), keys)
    assert isinstance(later, DesiredWorkload)
    assert (later.labels, later.addresses) == (early.labels, ("10.244.1.5",))
    unbound = desired_workload(pod({"app": "web"}, ips=()), NS, LabelMapping(), keys)
    assert isinstance(unbound, Skip) and not unbound.event
    # bound but the node key not declared: no node could enrol it, so it waits for its IP as before
    assert isinstance(desired_workload(bound, NS, LabelMapping(), KEYS), Skip)
    # bound with a label Stockade refuses: skipped (with an event), never an address-less workload either
    bad = desired_workload({**bound, "metadata": {**bound["metadata"], "labels": {"app": "bad value!"}}}, NS,
                           LabelMapping(), keys)
    assert isinstance(bad, Skip) and bad.event


def test_an_undeclared_target_key_skips() -> None:
    mapping = LabelMapping(pod=(("team", "team"),), namespace=())
    assert isinstance(desired_workload(pod({"team": "a"}), NS, mapping, KEYS), Skip)


def test_long_names_are_valid_unique_and_cannot_collide_with_short_ones() -> None:
    a, b = PodKey("n" * 63, "p" * 253), PodKey("n" * 63, "p" * 252)
    assert is_valid_name(workload_name(a)) and is_valid_name(workload_name(b))
    assert workload_name(a) != workload_name(b)
    assert "_" in workload_name(a)
    assert workload_name(PodKey("ns", "pod.with.dots")) == "k8s.ns.pod.with.dots"


def test_mapping_targets_must_be_valid_keys() -> None:
    with pytest.raises(ValueError, match="not a valid Stockade key"):
        LabelMapping.parse({"app": "bad key"}, {})
