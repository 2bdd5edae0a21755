"""The WireGuard datapath choice and the kernel path's configurator, on real devices.

This machine has no WireGuard module, so:

* ``STOCKADE_WIREGUARD=kernel`` fails closed here: the apply raises a clear error, the ruleset
  (loaded first) keeps the encrypted rule's traffic dropped and never on the wire in the clear,
  the plain rule keeps working, ``verify`` reports the missing interface; a wireguard-go
  interface already up is replaced, not kept; back on ``auto`` the tunnel is up on wireguard-go
  and the backend reports ``wireguard-go``.
* The ``wg`` tool, which configures a kernel device over genetlink, configures wireguard-go over
  its UAPI socket: so the kernel path's configurator runs here against real devices. Peers are
  added, re-addressed, moved to a new endpoint, rotated and removed one at a time; each step is
  read back with ``wg show NAME dump``; the two live sessions keep their handshake (to the
  nanosecond: no session was reset) and keep carrying traffic.

What is not tested here: ``ip link add NAME type wireguard`` succeeding (the module itself).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.wgconf import (
    WG_BATCH,
    UapiConfigurator,
    WgToolConfigurator,
    create_kernel_link,
    key_b64,
    no_module,
)
from stockade.backends.wireguard import SOCKET_MARK, Datapath, DatapathChoice, Tunnel, WireGuardDevice
from stockade.compiler.compile import Compiler
from stockade.compiler.ir import PeerDelta, WireGuardConfig, WireGuardPeer
from stockade.errors import ApplyError
from stockade.lab.netns import create_bridge_namespace, delete_namespace
from stockade.lab.wglab import WG_TOOL, marker, probe, wg_lab
from tests.kernel.test_wireguard import base_policy, labels, until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                       reason="needs wireguard-go and wireguard-tools"),
]


def kernel_module_missing() -> bool:
    """Whether this kernel lacks WireGuard (``ip link add type wireguard`` says so), in a scratch namespace."""
    ns = f"stkwgmod-{os.getpid()}"
    create_bridge_namespace(ns)
    try:
        error = create_kernel_link("wgprobe0", ns)
    finally:
        delete_namespace(ns)
    return error is not None and no_module(error)


def test_forced_kernel_without_the_module_fails_closed(tmp_path: Path) -> None:
    if not kernel_module_missing():
        pytest.skip("this kernel has the WireGuard module: the fallback cannot be exercised")
    with wg_lab(3, tmp_path, "nftables", choice=DatapathChoice.AUTO) as lab:
        apps = labels(h0="web", h1="db", h2="other")
        web, db = lab.hosts["h0"], lab.hosts["h1"]
        db.device.choice = DatapathChoice.KERNEL
        lab.compiler = Compiler(base_policy(lab, apps))
        for name, h in lab.hosts.items():
            hp = lab.compiler.host_policy(name)
            if h is db:
                with pytest.raises(ApplyError) as exc:
                    h.enforce(hp)
                assert "STOCKADE_WIREGUARD=kernel" in str(exc.value) and "Unknown device type" in str(exc.value)
            else:
                h.enforce(hp)
        cap = lab.capture
        assert cap is not None
        assert web.backend.wireguard_datapath() == "wireguard-go" and web.device.datapath is Datapath.USERSPACE
        assert db.backend.wireguard_datapath() == "" and not db.device.exists()  # no wireguard-go started
        db_hp = lab.compiler.host_policy("h1")
        assert any("is missing" in p for p in db.backend.verify(db.backend.render(db_hp)).problems)

        def encrypted_flow_dropped() -> None:
            for mark in (None, SOCKET_MARK):  # through web's tunnel, and plaintext past the steering
                cap.clear()
                m = marker()
                assert not probe(web.netns, web.v4, db.v4, 5432, m, timeout=0.4, mark=mark)
                time.sleep(0.05)
                assert not cap.seen(m), "the encrypted rule's payload crossed the wire in the clear"
            assert probe(web.netns, web.v4, db.v4, 80, marker())  # the plain rule: the ruleset is in force

        encrypted_flow_dropped()

        # a wireguard-go interface already up is not kept when the kernel is forced: fail closed too
        db.device.choice = DatapathChoice.AUTO
        db.enforce(db_hp)
        assert db.device.datapath is Datapath.USERSPACE and db.backend.wireguard_datapath() == "wireguard-go"
        # web's handshakes to the absent db are in WireGuard's retry back-off (5 s): generous bound
        assert until(lambda: probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=1.0), 12.0) < 12.0
        db.device.choice = DatapathChoice.KERNEL
        assert db.backend.verify(db.backend.render(db_hp)).problems == (
            f"WireGuard interface {db.device.name} runs on wireguard-go, but STOCKADE_WIREGUARD=kernel",)
        with pytest.raises(ApplyError, match="STOCKADE_WIREGUARD=kernel"):
            db.enforce(db_hp)
        assert not db.device.exists()
        encrypted_flow_dropped()

        # back to auto: the device comes back on wireguard-go, in sync (web, whose old session db
        # forgot, re-handshakes on WireGuard's own timers, ~15 s: not waited for here)
        db.device.choice = DatapathChoice.AUTO
        db.enforce(db_hp)
        assert db.backend.wireguard_datapath() == "wireguard-go"
        assert db.backend.verify(db.backend.render(db_hp)).ok


def _sessions(name: str) -> dict[str, tuple[int, int, int]]:
    """Each peer's (handshake seconds, nanoseconds, bytes received) from wireguard-go's UAPI: a
    reset session handshakes again, so its timestamp changes (to the nanosecond)."""
    text = UapiConfigurator(name)._request("get=1\n\n")
    out: dict[str, tuple[int, int, int]] = {}
    key, fields = "", {}
    for line in [*text.splitlines(), "public_key=00"]:
        k, _, v = line.partition("=")
        if k == "public_key":
            if key:
                out[key] = (int(fields["last_handshake_time_sec"]), int(fields["last_handshake_time_nsec"]),
                            int(fields["rx_bytes"]))
            key, fields = (key_b64(v) if len(v) == 64 else ""), {}
        elif key:
            fields[k] = v
    return out


def _fake(i: int) -> WireGuardPeer:
    return WireGuardPeer(f"fake{i:04d}", base64.b64encode(os.urandom(32)).decode(),
                         ipaddress.ip_address(f"192.0.2.{1 + i % 250}"), 51820,
                         (ipaddress.ip_network(f"10.201.{i // 250}.{i % 250}/32"),
                          ipaddress.ip_network(f"fd20:1::{i:x}/128")))


def test_wg_tool_changes_one_peer_at_a_time_and_leaves_the_other_sessions_alone(tmp_path: Path) -> None:
    with wg_lab(3, tmp_path, "nftables" + WG_TOOL) as lab:
        apps = labels(h0="web", h1="db", h2="other")
        lab.apply(base_policy(lab, apps))
        web, db, other = lab.hosts["h0"], lab.hosts["h1"], lab.hosts["h2"]
        assert isinstance(db.device.config, WgToolConfigurator)  # the kernel path's configurator
        assert probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=2.0)
        assert probe(other.netns, other.v4, db.v4, 6000, marker(), timeout=2.0)
        live = {web.public_key, other.public_key}
        before = _sessions(db.device.name)
        assert set(before) == live and all(s[0] > 0 for s in before.values())
        conf = db.device.config

        fakes = [_fake(i) for i in range(20)]
        for p in fakes:  # added one `wg set ... peer` at a time
            db.device.add_peer(p)
        _, peers = conf.dump()  # read back through `wg show NAME dump`
        assert set(peers) == live | {p.public_key for p in fakes}
        for p in fakes:
            assert peers[p.public_key].endpoint == f"{p.endpoint}:51820"
            assert peers[p.public_key].allowed == frozenset(str(n) for n in p.allowed)

        moved = replace(fakes[0], endpoint=ipaddress.ip_address("2001:db8::7"), port=51999)
        conf.set_endpoint(moved)  # endpoint only: allowed addresses kept
        readdressed = replace(fakes[1], allowed=(ipaddress.ip_network("10.202.0.1/32"),))
        db.device.add_peer(readdressed)  # allowed addresses replaced, not added to
        rotated = replace(fakes[2], public_key=base64.b64encode(os.urandom(32)).decode())
        old = WireGuardConfig(51820, tuple(fakes))
        Tunnel(db.device).apply_peer_delta(old, PeerDelta(upserted=(rotated,), removed=(fakes[3].workload,)))
        _, peers = conf.dump()
        assert peers[moved.public_key].endpoint == "[2001:db8::7]:51999"
        assert peers[moved.public_key].allowed == frozenset(str(n) for n in fakes[0].allowed)
        assert peers[readdressed.public_key].allowed == frozenset({"10.202.0.1/32"})
        assert fakes[2].public_key not in peers and rotated.public_key in peers
        assert fakes[3].public_key not in peers

        for key in [p.public_key for p in fakes[:2]] + [rotated.public_key] + [p.public_key for p in fakes[4:]]:
            db.device.remove_peer(key)
        _, peers = conf.dump()
        assert set(peers) == live
        # many at once (a first start, a reconcile): batched `wg set` calls, still peer by peer
        bulk = [_fake(i) for i in range(1000, 1000 + 2 * WG_BATCH + 50)]
        conf.change_peers(bulk, [])
        _, peers = conf.dump()
        assert set(peers) == live | {p.public_key for p in bulk}
        assert peers[bulk[-1].public_key].allowed == frozenset(str(n) for n in bulk[-1].allowed)
        hp = lab.compiler.host_policy("h1") if lab.compiler else None
        assert hp is not None and hp.wireguard is not None
        assert db.device.reconcile(hp.wireguard) == (0, len(bulk))  # the extras removed, the live kept
        assert set(conf.dump()[1]) == live
        # the live peers' sessions were never reset: same handshake, and they still carry traffic
        assert probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=0.6)
        assert probe(other.netns, other.v4, db.v4, 6000, marker(), timeout=0.6)
        after = _sessions(db.device.name)
        for key in live:
            assert after[key][:2] == before[key][:2], "a live peer's session was reset"
            assert after[key][2] > before[key][2]
        # and the full reconcile through the same configurator finds nothing to do
        assert db.device.reconcile(hp.wireguard) == (0, 0)
        assert db.backend.verify(db.backend.render(hp)).ok
        # an agent restarted finds the interface and what it runs on (`ip -d link`: a tun)
        again = WireGuardDevice(db.device.name, db.netns, db.key_file, DatapathChoice.AUTO)
        assert again.alive() and again.datapath is Datapath.USERSPACE and again.problems(hp.wireguard) == []
