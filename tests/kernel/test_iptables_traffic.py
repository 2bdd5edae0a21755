"""Real TCP through the iptables+ipset backend (both variants): a client and a server netns on a veth pair.

The same scenarios and helpers as ``test_nftables_traffic.py``: full mode lets the
allowed port through (IPv4 and IPv6, so neighbour discovery must pass the failsafe); a
refused apply leaves the probes unchanged; an ipset delta removing the client blocks it
and adding it back lets it in; selective enforces only the deny; visibility drops nothing
but logs each would-be drop to NFLOG with ``stk:pb:<rule id>``; outbound rules are
enforced at the client; idle opens everything again.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.render import IptablesVariant
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.errors import ApplyError
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from tests.kernel.test_nftables_traffic import (
    ALL_OPEN,
    CLI4,
    CLI6,
    ONLY_80,
    PROBE,
    SRV4,
    SRV6,
    Pair,
    nflog_prefixes,
    nflog_socket,
    pair,
    probe,
    server_policy,
)

pytestmark = pytest.mark.kernel
__all__ = ["pair"]  # the fixture, shared with the nftables traffic test

VARIANTS = tuple(IptablesVariant)


@pytest.fixture(params=VARIANTS, ids=[v.value for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> IptablesVariant:
    v: IptablesVariant = request.param
    for tool in (v.tool(Family.V4, "restore"), v.tool(Family.V6, "restore"), "ipset", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    return v


def test_full_mode_allows_only_the_allowed_port(pair: Pair, variant: IptablesVariant) -> None:
    assert probe(pair) == ALL_OPEN
    backend = IptablesBackend(variant, netns=pair.srv)
    good = backend.render(server_policy(EnforcementMode.FULL))
    backend.apply(good)
    assert probe(pair) == ONLY_80

    # a refused apply (IPv6 restore fails after IPv4 went in) leaves the old ruleset working
    newer = backend.render(server_policy(EnforcementMode.VISIBILITY))
    rulesets = tuple(
        replace(r, chains=tuple(replace(c, rules=(*c.rules, "-j NO-SUCH")) for c in r.chains))
        if r.family is Family.V6
        else r
        for r in newer.rulesets
    )
    with pytest.raises(ApplyError):
        backend.apply(dataclasses.replace(newer, rulesets=rulesets))
    assert probe(pair) == ONLY_80
    assert backend.verify(good).ok

    # peer churn through ipset deltas, no reload
    v4 = ipaddress.ip_network(CLI4)
    backend.apply_delta((SetDelta("pclients", Family.V4, (), (v4,)),))
    assert probe(pair) == {**ONLY_80, f"{SRV4}:80": False}
    backend.apply_delta((SetDelta("pclients", Family.V4, (v4,), ()),))
    assert probe(pair) == ONLY_80

    backend.remove()
    assert probe(pair) == ALL_OPEN


def test_selective_and_visibility_logs_would_be_drops(pair: Pair, variant: IptablesVariant) -> None:
    backend = IptablesBackend(variant, netns=pair.srv, log_group=7)
    backend.apply(backend.render(server_policy(EnforcementMode.SELECTIVE)))
    assert probe(pair) == ALL_OPEN  # selective: default allow
    backend.apply(backend.render(server_policy(EnforcementMode.SELECTIVE, deny_81=True)))
    assert probe(pair) == ONLY_80  # the deny is enforced

    backend.apply(backend.render(server_policy(EnforcementMode.VISIBILITY, deny_81=True)))
    sock = nflog_socket(pair.srv, 7)
    try:
        assert probe(pair) == ALL_OPEN  # visibility: nothing dropped ...
        subprocess.run(
            ["ip", "netns", "exec", pair.cli, sys.executable, "-c", PROBE, f"{SRV4}:82", f"{SRV6}:82"],
            capture_output=True,
            check=True,
        )
        want = {"stk:pb:deny/no-81", "stk:pb:default"}
        assert nflog_prefixes(sock, want) >= want  # ... but each would-be drop is logged with its rule
    finally:
        sock.close()
    counted = subprocess.run(
        ["ip", "netns", "exec", pair.srv, variant.tool(Family.V4, "save"), "-c", "-t", "filter"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    nflog_lines = [line for line in counted.splitlines() if '"deny/no-81"' in line and "-j NFLOG" in line]
    assert nflog_lines and not nflog_lines[0].startswith("[0:0]"), counted


def test_outbound_enforced_at_the_client(pair: Pair, variant: IptablesVariant) -> None:
    hp = HostPolicy(
        workload="cli",
        mode=EnforcementMode.FULL,
        local_addresses=(ipaddress.ip_address(CLI4), ipaddress.ip_address(CLI6)),
        rules=(
            HostRule(Action.ALLOW, Direction.OUTBOUND, "ruleset/web/1", "pservers", (ServiceEntry(Proto.TCP, 80, 80),)),
        ),
        sets=(
            AddressSet("pservers", Family.V4, (ipaddress.ip_network(SRV4),)),
            AddressSet("pservers", Family.V6, (ipaddress.ip_network(SRV6),)),
        ),
        failsafe=Failsafe(),
    )
    backend = IptablesBackend(variant, netns=pair.cli)
    backend.apply(backend.render(hp))
    assert probe(pair) == ONLY_80
    backend.apply(backend.render(replace(hp, mode=EnforcementMode.IDLE)))
    assert probe(pair) == ALL_OPEN
