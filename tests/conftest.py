"""Suite-wide hooks.

``--dist loadgroup`` (pyproject's addopts) keeps the tests that share state or a resource (the e2e
estate's controller address, a browser module's estate) on one xdist worker. pytest-xdist marks a
grouped test by appending ``@group`` to ``Item._nodeid``; pytest 9 keeps the node id in ``Item._id``
(a ``NodeId``), so the suffix never reaches ``nodeid`` and every test is scheduled alone. This hook
runs after xdist's and carries the suffix over, so grouping works on pytest 8 and 9 alike
(``tests/unit/test_xdist_grouping.py`` checks it through a real ``pytest -n 2`` run).
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in items:
        grouped = item.__dict__.get("_nodeid")
        if not isinstance(grouped, str) or item.nodeid == grouped:
            continue
        try:
            from _pytest.nodeid import coerce_node_id
        except ImportError:  # pytest 8: _nodeid is the node id, nothing to carry over
            return
        item._id = coerce_node_id(grouped)  # type: ignore[attr-defined]
