"""Suite-wide hooks.

``--dist loadgroup`` (pyproject's addopts) keeps the tests that share state or a resource (the e2e
estate's controller address, a browser module's estate) on one xdist worker. pytest-xdist marks a
grouped test by appending ``@group`` to ``Item._nodeid`` in its own collection hook, which fails two
ways: pytest 9 keeps the node id in ``Item._id`` (a ``NodeId``), so the suffix never reaches
``nodeid``; and a group marker added by a conftest hook that runs after xdist's is never seen. This
hook runs last and writes the suffix from the markers themselves, so grouping works on pytest 8 and 9
whoever adds the marker (``tests/unit/test_xdist_grouping.py`` checks both through real runs).
"""

from __future__ import annotations

import pytest


def _group(item: pytest.Item) -> str | None:
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    return "_".join(sorted(names)) if names else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # pytest 8: the node id is Item._nodeid
        coerce_node_id = None
    for item in items:
        group = _group(item)
        if group is None or item.nodeid.endswith(f"@{group}"):
            continue
        grouped = f"{item.nodeid}@{group}"
        if coerce_node_id is None:
            item._nodeid = grouped
        else:
            item._id = coerce_node_id(grouped)  # type: ignore[attr-defined]
