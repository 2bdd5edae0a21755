"""Golden files of the encrypted-rule rendering (``encrypt: true``), one per Linux backend that
encrypts: tests/golden/encrypt/<backend>.<ext> (eBPF: its maps, where the encrypted allows'
verdict is ``allow-encrypted`` and the WireGuard port a failsafe allow from their peer sets).

One host policy with an inbound and an outbound encrypted allow (TCP and UDP), a plain allow
beside them, and two WireGuard peers (IPv4 and IPv6 endpoints), rendered by nftables and by
both iptables variants with the same interface name: the steering (nftables ``route`` chain /
iptables mangle ``MARK``+``CONNMARK``), the plaintext drops of each encrypted rule, the guards
(encrypted connections only from the tunnel; a marked packet leaving by another device dropped)
and the peers' WireGuard UDP accept. On a mismatch ``.actual`` is written beside the golden
file; ``STOCKADE_UPDATE_GOLDEN=1`` rewrites them. The kernel test
``tests/kernel/test_wireguard.py`` loads the same kind of policy for real on every backend.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.ebpf.render import render_ebpf
from stockade.backends.iptables.render import IptablesVariant, render_iptables
from stockade.backends.nftables.render import render_nftables
from stockade.compiler.ir import WireGuardConfig, WireGuardPeer
from stockade.errors import RenderError
from tests.golden.nft_cases import ALLOW, DB, FULL, IN, OUT, WEB, HostRule, host, tcp, udp

GOLDEN_DIR = Path(__file__).parent / "encrypt"
UPDATE = os.environ.get("STOCKADE_UPDATE_GOLDEN") == "1"
KEY_A = "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE="
KEY_B = "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI="
WG = "wgstk0"

PEERS = WireGuardConfig(51820, (
    WireGuardPeer("db-1", KEY_A, ipaddress.ip_address("10.0.1.20"), 51820,
                  (ipaddress.ip_network("10.0.1.20/32"), ipaddress.ip_network("fd00:1::20/128"))),
    WireGuardPeer("web-2", KEY_B, ipaddress.ip_address("fd00::11"), 51821,
                  (ipaddress.ip_network("10.0.0.11/32"), ipaddress.ip_network("fd00::11/128"))),
))
POLICY = replace(host(FULL, [
    HostRule(ALLOW, IN, "ruleset/enc/0", WEB[0].name, (tcp(443), udp(4789)), encrypt=True),
    HostRule(ALLOW, OUT, "ruleset/enc/1", DB[0].name, (tcp(5432),), encrypt=True),
    HostRule(ALLOW, IN, "ruleset/plain/0", WEB[0].name, (tcp(80),)),
], [WEB, DB]), wireguard=PEERS)

RENDERINGS = {
    "nftables.nft": lambda: render_nftables(POLICY, wg_interface=WG).to_text(),
    **{f"iptables-{v.value}.rules": (lambda v=v: render_iptables(POLICY, variant=v, wg_interface=WG).to_text())
       for v in IptablesVariant},
    "ebpf.maps": lambda: render_ebpf(POLICY).to_text(),
}


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_golden(name: str) -> None:
    text = RENDERINGS[name]()
    golden = GOLDEN_DIR / name
    actual = GOLDEN_DIR / f"{name}.actual"
    if UPDATE:
        golden.write_text(text)
    if not golden.exists() or golden.read_text() != text:
        actual.write_text(text)
        pytest.fail(f"rendering differs from {golden}; see {actual} (STOCKADE_UPDATE_GOLDEN=1 to accept)")
    actual.unlink(missing_ok=True)


def test_every_golden_file_has_a_rendering() -> None:
    assert sorted(p.name for p in GOLDEN_DIR.iterdir() if not p.name.endswith(".actual")) == sorted(RENDERINGS)


@pytest.mark.parametrize("bad", [None, "", "wg0; rm", "a" * 16, "0wg"])
def test_encrypted_rules_need_a_valid_interface_on_every_backend(bad: str | None) -> None:
    with pytest.raises(RenderError, match="WireGuard interface"):
        render_nftables(POLICY, wg_interface=bad)
    with pytest.raises(RenderError, match="WireGuard interface"):
        render_iptables(POLICY, wg_interface=bad)


def test_iptables_without_encryption_renders_no_steering() -> None:
    plain = replace(POLICY, rules=POLICY.rules[2:], wireguard=None)
    artifact = render_iptables(plain, wg_interface=WG)
    assert artifact.mangle == () and artifact.wireguard is None and "*mangle" not in artifact.to_text()
