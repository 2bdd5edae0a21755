"""ipset set deltas over netlink (no ``ipset`` process) against the real kernel, each test in its own netns.

A one-element delta adds or removes exactly that element (``ipset list`` shows it, nothing
else changed) for v4 and v6, host and net members, with the command runner disabled so no
process can have done it; a delta naming a missing set fails with an error naming the set and
changes nothing (the other set of the same delta included); a refusal in the middle of a
delta (a full set) is undone element by element; the ``ipset`` command path is the declared
fallback when the kernel refuses netlink, and can be asked for.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.ipset_netlink import IpsetNetlink, SetChange
from stockade.backends.iptables.model import DeltaPath
from stockade.backends.iptables.render import IptablesVariant, ipset_name
from stockade.backends.iptables.runner import Command, Result
from stockade.compiler.ir import SetDelta
from stockade.errors import ApplyError
from stockade.model.addresses import Family, IPNetwork
from tests.golden.test_iptables_golden import ALL_CASES, backend_for

pytestmark = pytest.mark.kernel

CASE = {c.name: c for c in ALL_CASES}["visibility"]  # a policy with v4 and v6 peer sets
VARIANT = IptablesVariant.LEGACY


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stk-ipnl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def ipset(ns: str, *argv: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, "ipset", *argv], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"ipset {argv}: {proc.stderr}"
    return proc.stdout


def members(ns: str, set_name: str) -> set[str]:
    text = ipset(ns, "list", set_name)
    return set(text.split("Members:\n", 1)[1].split())


def n(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def no_commands(cmd: Command) -> Result:
    raise AssertionError(f"a set delta ran a command: {cmd.argv}")


@pytest.fixture
def applied(netns: str) -> Iterator[IptablesBackend]:
    backend = backend_for(CASE, VARIANT, netns)
    backend.apply(backend.render(CASE.policy))
    with backend:
        yield backend


def test_netlink_delta_adds_and_removes_exactly_the_element(applied: IptablesBackend, netns: str) -> None:
    peer = CASE.policy.rules[1].peer
    applied.runner.run = no_commands  # type: ignore[method-assign]
    cases = [
        (Family.V4, "10.77.1.2/32", "10.77.1.2"),
        (Family.V4, "10.78.0.0/16", "10.78.0.0/16"),
        (Family.V6, "fd00:77::5/128", "fd00:77::5"),
        (Family.V6, "fd00:78::/64", "fd00:78::/64"),
    ]
    for family, member, listed in cases:
        name = ipset_name(applied.prefix, peer, family)
        before = members(netns, name)
        assert listed not in before
        applied.apply_delta((SetDelta(peer, family, (n(member),), ()),))
        assert members(netns, name) == before | {listed}, member
        ipset(netns, "test", name, listed.split("/")[0])
        applied.apply_delta((SetDelta(peer, family, (), (n(member),)),))
        assert members(netns, name) == before, member
    assert applied.delta_path_used is DeltaPath.NETLINK
    # -exist semantics: adding a present member, deleting an absent one change nothing
    name4 = ipset_name(applied.prefix, peer, Family.V4)
    present = next(iter(members(netns, name4)))
    before = members(netns, name4)
    applied.apply_delta((SetDelta(peer, Family.V4, (n(present),), (n("10.79.9.9/32"),)),))
    assert members(netns, name4) == before
    # /0 is two /1 halves (hash:net cannot hold /0), as on the command path
    applied.apply_delta((SetDelta(peer, Family.V4, (n("0.0.0.0/0"),), ()),))
    assert members(netns, name4) == before | {"0.0.0.0/1", "128.0.0.0/1"}
    applied.apply_delta((SetDelta(peer, Family.V4, (), (n("0.0.0.0/0"),)),))
    assert members(netns, name4) == before


def test_netlink_delta_to_missing_set_fails_and_changes_nothing(applied: IptablesBackend, netns: str) -> None:
    peer = CASE.policy.rules[1].peer
    applied.runner.run = no_commands  # type: ignore[method-assign]
    saved = ipset(netns, "save")
    missing = ipset_name(applied.prefix, "pnosuch00009", Family.V6)
    with pytest.raises(ApplyError, match=f"ipset {missing} does not exist \\(nothing changed\\)"):
        applied.apply_delta(
            (
                SetDelta(peer, Family.V4, (n("10.77.9.9/32"),), ()),  # exists: must not change either
                SetDelta("pnosuch00009", Family.V6, (n("fd00::9/128"),), ()),
            )
        )
    assert ipset(netns, "save") == saved


def test_refusal_midway_is_undone(netns: str) -> None:
    ipset(netns, "create", "full3", "hash:net", "family", "inet", "maxelem", "3")
    for m in ("10.0.0.1", "10.0.0.2"):
        ipset(netns, "add", "full3", m)
    with IpsetNetlink(netns) as nl:
        change = SetChange(
            "full3", Family.V4, add=(n("10.0.1.0/24"), n("10.0.2.0/24"), n("10.0.3.0/24")), delete=(n("10.0.0.1/32"),)
        )
        with pytest.raises(ApplyError) as info:
            nl.change([change])
    message = str(info.value)
    assert "add full3 10.0.3.0/24: set is full" in message, message
    assert "3 element change(s) undone" in message, message
    assert members(netns, "full3") == {"10.0.0.1", "10.0.0.2"}


def test_command_path_is_the_declared_fallback(netns: str, caplog: pytest.LogCaptureFixture) -> None:
    peer = CASE.policy.rules[1].peer
    name = ipset_name("STOCKADE", peer, Family.V4)
    asked = IptablesBackend(VARIANT, netns=netns, delta_path=DeltaPath.IPSET_CLI)
    asked.apply(asked.render(CASE.policy))
    asked.apply_delta((SetDelta(peer, Family.V4, (n("10.77.3.3/32"),), ()),))
    assert asked.delta_path_used is DeltaPath.IPSET_CLI
    assert "10.77.3.3" in members(netns, name)

    refused = backend_for(CASE, VARIANT, netns)

    def refuse(self: IpsetNetlink) -> int:
        raise ApplyError("the kernel refuses ipset over netlink: EPROTONOSUPPORT")

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING):
        mp.setattr(IpsetNetlink, "probe", refuse)
        refused.apply_delta((SetDelta(peer, Family.V4, (), (n("10.77.3.3/32"),)),))
    assert refused.delta_path_used is DeltaPath.IPSET_CLI
    assert "10.77.3.3" not in members(netns, name)
    assert "set deltas use the ipset command" in caplog.text
    with pytest.raises(ApplyError, match="ipset refused the set delta"):  # same contract: missing set, no change
        refused.apply_delta((SetDelta("pnosuch00009", Family.V4, (n("10.0.0.1/32"),), ()),))
