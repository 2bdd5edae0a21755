"""``stockade apply`` enforces a workload of the example estate inside a network namespace."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from stockade.backends.nftables.backend import NftablesBackend
from stockade.cli import main
from stockade.compiler import compile_host
from stockade.paths import example_estate
from stockade.policyfile import load_policy

pytestmark = pytest.mark.kernel


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stk-nftcli-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_apply_in_netns(netns: str) -> None:
    estate = example_estate()
    result = CliRunner().invoke(main, ["apply", str(estate), "-w", "web-prod-1", "--netns", netns])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    backend = NftablesBackend(netns=netns)
    expected = backend.render(compile_host(load_policy(estate), "web-prod-1"))
    assert backend.verify(expected).ok
