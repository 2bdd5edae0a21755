"""SelectorIndex (issue 19): exact matches, and namespaced selectors do not pile into one bucket."""

from __future__ import annotations

from stockade.compiler.index import SelectorIndex, label_keys
from stockade.model import ALL_WORKLOADS, Label, LabelGroup, LabelSelector


def test_namespaced_selectors_bucket_under_the_rare_label() -> None:
    """10,000 namespaces each select app=backend: a backend pod must not scan all of them."""
    idx = SelectorIndex({})
    for i in range(1000):
        idx.add(i, LabelSelector((Label("app", "backend"), Label("ns", f"n{i:04d}"))))
    pod = label_keys({Label("app", "backend"), Label("ns", "n0007")})
    assert idx.matching(pod) == {7}
    assert max(len(bucket) for bucket in idx.by_label.values()) == 1


def test_exclude_groups_and_everything() -> None:
    groups = {"tiers": LabelGroup("tiers", "role", frozenset({"web", "app"}))}
    idx = SelectorIndex(groups)
    idx.add(0, ALL_WORKLOADS)
    idx.add(1, LabelSelector(groups=("tiers",), exclude=(Label("env", "dev"),)))
    idx.add(2, LabelSelector((Label("role", "db"),)))
    assert idx.matching(label_keys({Label("role", "web")})) == {0, 1}
    assert idx.matching(label_keys({Label("role", "web"), Label("env", "dev")})) == {0}
    assert idx.matching(label_keys({Label("role", "db")})) == {0, 2}
    assert idx.mentioned == label_keys(
        {Label("role", "web"), Label("role", "app"), Label("env", "dev"), Label("role", "db")}
    )
