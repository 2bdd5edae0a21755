"""The iptables backend's rollback point without ``iptables-save``, against the real kernel, both variants.

An apply after the backend's own apply loads what the raw load loads and reads nothing back
(no ``iptables-save``), because the tables' token (nf_tables generation / x_tables shape)
says nothing changed; a change by someone else between two applies (our jump deleted, a
foreign rule inserted) makes the next apply read the tables again and put everything right;
a remembered state that is wrong although the token did not move is caught by the restore
failing and the apply retried from a fresh read. "A failed apply leaves the previous ruleset"
is tested, with this path in use, by tests/kernel/test_iptables_backend.py.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import Hook
from stockade.backends.iptables.render import IptablesVariant
from stockade.backends.iptables.runner import Command, Result
from stockade.backends.iptables.scripts import Jump
from stockade.model.addresses import Family
from tests.golden.test_iptables_golden import ALL_CASES, backend_for

pytestmark = pytest.mark.kernel

CASE = {c.name: c for c in ALL_CASES}["full_basic"]
VARIANTS = tuple(IptablesVariant)


@pytest.fixture(params=VARIANTS, ids=[v.value for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> IptablesVariant:
    v: IptablesVariant = request.param
    for tool in (v.tool(Family.V4, "restore"), "ipset", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    return v


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stk-iptc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def commands(backend: IptablesBackend) -> list[str]:
    """Record the binaries ``backend`` runs from now on."""
    seen: list[str] = []
    real = backend.runner.run

    def run(cmd: Command) -> Result:
        seen.append(" ".join(cmd.argv))
        return real(cmd)

    backend.runner.run = run  # type: ignore[method-assign]
    return seen


def saves(seen: list[str]) -> int:
    return sum("-save -t filter" in c for c in seen)


def iptables(ns: str, variant: IptablesVariant, *argv: str) -> None:
    wait = ("-w",) if variant is IptablesVariant.LEGACY else ()
    tool = variant.tool(Family.V4, "restore").replace("-restore", "")
    subprocess.run(["ip", "netns", "exec", ns, tool, *wait, *argv], check=True)


def test_apply_after_our_own_reads_nothing_back(variant: IptablesVariant, netns: str) -> None:
    backend = backend_for(CASE, variant, netns)
    artifact = backend.render(CASE.policy)
    seen = commands(backend)
    backend.apply(artifact)
    assert saves(seen) == 2  # first apply: nothing remembered, both families read
    seen.clear()
    backend.apply(artifact)
    assert not [c for c in seen if "-save" in c], seen  # neither filter nor mangle
    assert sorted(c.split()[0] for c in seen) == sorted(
        ["ipset", variant.tool(Family.V4, "restore"), variant.tool(Family.V6, "restore"), "ipset"]
    )
    assert backend.verify(artifact).ok


def test_a_change_by_someone_else_is_read_before_the_next_apply(variant: IptablesVariant, netns: str) -> None:
    backend = backend_for(CASE, variant, netns)
    artifact = backend.render(CASE.policy)
    backend.apply(artifact)
    iptables(netns, variant, "-D", "INPUT", "-j", "STOCKADE-INPUT")  # our jump deleted behind our back
    iptables(netns, variant, "-I", "INPUT", "1", "-p", "tcp", "--dport", "2222", "-j", "ACCEPT")
    assert not backend.verify(artifact).ok
    seen = commands(backend)
    backend.apply(artifact)
    assert saves(seen) == 2, seen  # the token moved: both families read again
    report = backend.verify(artifact)
    assert report.ok, report.problems


def test_a_wrong_memory_is_caught_and_the_apply_retried(variant: IptablesVariant, netns: str) -> None:
    backend = backend_for(CASE, variant, netns)
    artifact = backend.render(CASE.policy)
    backend.apply(artifact)
    assert backend._known is not None
    # claim a jump to our chains that the kernel does not hold: its ``-D`` makes the restore fail
    gone = Jump(Hook.INPUT, 2, "-p udp -j STOCKADE-INPUT")
    phantom = {f: dataclasses.replace(s, jumps=(*s.jumps, gone)) for f, s in backend._known.items()}
    backend._known = phantom
    seen = commands(backend)
    backend.apply(artifact)
    assert saves(seen) == 2, seen  # the retry read the tables
    report = backend.verify(artifact)
    assert report.ok, report.problems
