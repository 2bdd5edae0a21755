"""The iptables lookup layout in a real kernel (both variants): deep port trees, flow logging once.

* a policy of ~600 rules over three tiers, whose port trees are several levels deep, lets
  the client reach port 80 (allowed by one rule among hundreds) and not 81 (a deny behind
  hundreds of other denies), v4 and v6; ``verify`` finds exactly the rendered chains; each
  TCP connection is logged once to NFLOG with its deciding rule (``stk:a:`` / ``stk:d:``);
* both layouts (``lookup``, the historic ``list``) enforce the same on the nftables lookup
  test's shared-peer policy (several rules and tiers using one peer set);
* a one-way UDP flow (every packet conntrack-NEW) is logged once, not per packet
  (``-m connbytes --connbytes 0:1``); a second flow is logged again; a dropped flow likewise;
  with ``flow_log=False`` only the verdicts remain.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import Layout
from stockade.backends.iptables.render import IptablesVariant
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode
from tests.kernel.test_iptables_traffic import variant  # noqa: F401  (fixture)
from tests.kernel.test_nftables_lookup import SEND_UDP, _count_prefixes, shared_peer_policy, udp_policy
from tests.kernel.test_nftables_traffic import (
    CLI4,
    CLI6,
    ONLY_80,
    SRV4,
    Pair,
    nflog_socket,
    pair,  # noqa: F401  (fixture)
    probe,
)

pytestmark = pytest.mark.kernel
n = ipaddress.ip_network


def deep_policy() -> HostPolicy:
    """Allow tier: 300 rules for others on 1000-1299 and 40-79, the client on 80 (rule 150);
    override-deny: 100 rules for others; deny: 150 rules for others, then the client on 81."""
    tcp = lambda lo, hi=None: (ServiceEntry(Proto.TCP, lo, hi),)  # noqa: E731
    rules: list[HostRule] = []
    rules += [HostRule(Action.OVERRIDE_DENY, Direction.INBOUND, f"od/{i}", "pother", tcp(2000 + i)) for i in range(100)]
    allows = [HostRule(Action.ALLOW, Direction.INBOUND, f"allow/{i}", "pother", tcp(1000 + i)) for i in range(300)]
    allows += [HostRule(Action.ALLOW, Direction.INBOUND, f"allow/low/{i}", "pother", tcp(40 + i)) for i in range(40)]
    allows.insert(150, HostRule(Action.ALLOW, Direction.INBOUND, "allow/client-80", "pclients", tcp(80)))
    rules += allows
    rules += [
        HostRule(Action.DENY, Direction.INBOUND, f"deny/{i}", "pother", tcp(3000 + i, 3000 + i + 5)) for i in range(150)
    ]
    rules.append(HostRule(Action.DENY, Direction.INBOUND, "deny/client-81", "pclients", tcp(81)))
    rules.append(HostRule(Action.ALLOW, Direction.OUTBOUND, "out/any", "pclients", (ServiceEntry(Proto.ANY),)))
    sets = (
        AddressSet("pclients", Family.V4, (n(CLI4),)),
        AddressSet("pclients", Family.V6, (n(CLI6),)),
        AddressSet("pother", Family.V4, (n("10.99.0.0/28"),)),
        AddressSet("pother", Family.V6, (n("fd99::/120"),)),
    )
    local = (ipaddress.ip_address(SRV4),)
    return HostPolicy("srv", EnforcementMode.FULL, local, tuple(rules), sets, Failsafe(management=()))


def test_deep_trees_enforce_and_log_the_deciding_rule(pair: Pair, variant: IptablesVariant) -> None:  # noqa: F811
    backend = IptablesBackend(variant, netns=pair.srv, log_group=11)
    artifact = backend.render(deep_policy())
    names = {c.name for c in artifact.ruleset(Family.V4).chains}
    assert "STOCKADE-IN-a-t3" in names  # the allow tier's tree has inner nodes
    sock = nflog_socket(pair.srv, 11)
    try:
        backend.apply(artifact)
        _count_prefixes(sock, 0.2)
        assert probe(pair) == ONLY_80
        counts = _count_prefixes(sock)
        assert backend.verify(artifact).ok, backend.verify(artifact).problems[:3]
    finally:
        sock.close()
        backend.remove()
    assert counts.get("stk:a:allow/client-80", 0) >= 2, counts  # v4 and v6, each connection once
    assert counts.get("stk:d:deny/client-81", 0) >= 2, counts
    # nothing else decided them (the default may log the namespace's own IPv6 chatter, e.g. MLD)
    assert set(counts) <= {"stk:a:allow/client-80", "stk:d:deny/client-81", "stk:d:default"}, counts


@pytest.mark.parametrize("layout", list(Layout), ids=[x.value for x in Layout])
def test_both_layouts_enforce_the_same(pair: Pair, variant: IptablesVariant, layout: Layout) -> None:  # noqa: F811
    backend = IptablesBackend(variant, netns=pair.srv, layout=layout)
    hp = shared_peer_policy((CLI4,), ())
    backend.apply(backend.render(hp))
    try:
        assert backend.verify(backend.render(hp)).ok
        result = probe(pair)
        assert all(v for k, v in result.items() if k.startswith(SRV4))
        assert not any(v for k, v in result.items() if not k.startswith(SRV4))
    finally:
        backend.remove()


@pytest.mark.parametrize("flow_log", [True, False], ids=["log", "nolog"])
def test_one_way_udp_flow_is_logged_once(pair: Pair, variant: IptablesVariant, flow_log: bool) -> None:  # noqa: F811
    backend = IptablesBackend(variant, netns=pair.srv, log_group=9, flow_log=flow_log)
    backend.apply(backend.render(udp_policy()))
    sock = nflog_socket(pair.srv, 9)
    try:
        _count_prefixes(sock, 0.2)
        for port, sports in ((53, ("40001", "40002")), (54, ("40003",))):  # 54: denied
            argv = ["ip", "netns", "exec", pair.cli, sys.executable, "-c", SEND_UDP, SRV4, str(port), *sports]
            subprocess.run(argv, check=True, capture_output=True)
        time.sleep(0.2)
        counts = _count_prefixes(sock)
    finally:
        sock.close()
        backend.remove()
    counts.pop("stk:d:default", None)  # the namespace's own IPv6 chatter (MLD) meets the default
    if flow_log:  # 40 allowed packets in two flows, 20 dropped packets in one flow
        assert counts == {"stk:a:ruleset/dns/0": 2, "stk:d:deny/no-54": 1}, counts
    else:
        assert counts == {}, counts
