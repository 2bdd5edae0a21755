"""SCTP per backend: the netfilter backends and F5 express it, the others refuse it (fail closed).

The goldens of ``sctp_ports`` (nftables, iptables, F5) are checked by each backend's golden
test; this module proves the refusals name the feature and the rule, and that the netfilter
renderings match SCTP by its ports (never as a port-less or any-protocol rule).
"""

from __future__ import annotations

import pytest

from stockade.backends.base import Backend
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ipfilter.backend import IpfilterBackend
from stockade.backends.iptables.backend import IptablesBackend, IptablesVariant
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.windows.backend import WindowsFirewallBackend
from stockade.errors import UnsupportedFeatureError
from tests.golden.nft_cases import SCTP_CASES

CASE = SCTP_CASES[0]


@pytest.mark.parametrize(
    "backend",
    [EbpfBackend(netns=None), WindowsFirewallBackend(), IpfilterBackend()],
    ids=["ebpf", "windows", "ipfilter"],
)
def test_backends_without_sctp_refuse_naming_feature_and_rule(backend: Backend) -> None:
    with pytest.raises(UnsupportedFeatureError) as info:
        backend.render(CASE.policy)
    assert "SCTP services" in str(info.value) and "deny/bad-sctp" in str(info.value)


def test_nftables_dispatches_sctp_ports_and_keeps_any_as_a_list_line() -> None:
    text = NftablesBackend().render(CASE.policy).to_text()
    assert "sctp . 3868 : jump" in text and "sctp . 2905-2910 : jump" in text and "sctp . 9900 : jump" in text
    assert "sctp . 1-1023 : jump" in text  # the deny tier's range
    assert "sctp . 0-65535 : jump in_override_0" in text  # the port-less SCTP override-deny
    assert "sctp . 0-65535 : jump in_allow" not in text  # ``any`` reaches SCTP by its list line, not the map


def test_iptables_matches_sctp_ports() -> None:
    text = IptablesBackend(IptablesVariant.LEGACY).render(CASE.policy).to_text()
    assert "-p sctp -m sctp --dport 3868" in text and "-p sctp -m sctp --dport 2905:2910" in text
    assert "-p sctp -m sctp --dport 1:1023" in text
