"""Encrypted rules proven on what the kernel holds, with real WireGuard tunnels (wireguard-go).

The WireGuard lab (three namespaces on a bridge, each with its wireguard-go interface; web -> db:
5432 tcp+udp encrypted, 80 plain; other -> db: 6000 and udp/5432 encrypted) is enforced by a Linux
backend; every host's loaded ruleset is read back and proven equal to its HostPolicy, the tunnel
dimension included (inbound: accepted only through the WireGuard interface; outbound: steered into
it, never sent in the clear). Then single mutations of the tunnel's part are written into the
kernel; each must give a counterexample, and the counterexample is sent for real:

* eBPF: ``allow-encrypted`` entries made plain ``allow`` at db (a plaintext datagram from web's
  address, sent past web's steering with wireguard-go's mark, now reaches db's server);
  ``stk_current``'s tunnel index pointed at web's Ethernet interface (web's SYN to db:5432 crosses
  the bridge in the clear: seen by the capture) or at no interface (the connection fails);
  wireguard-go's fwmark pass removed (a new connection carrying its mark is dropped at web: its
  SYN never reaches the wire; restored, it does). An fwmark other than wireguard-go's, and a
  tunnel whose programs were detached, are refused.
* nftables: the steering rule removed (the SYN never leaves), the postrouting guard removed with
  the policy route gone (the marked SYN crosses the bridge in the clear), the input guard removed
  (counterexample only: a forged in-window segment would be needed), the encrypted rule's
  clear-text drop removed (a plaintext datagram from web's address reaches db); an equivalent
  mutant (the outbound clear-text drop, with the steering intact) proven equal; an unknown mark
  refused.
* iptables (legacy and nft): the mangle steering removed, the mangle POSTROUTING guard removed with
  the route gone, the clear-text drop removed: each confirmed as above.
* 50 random encrypted policies per netfilter backend, loaded (rules only) and proven.
"""

from __future__ import annotations

import random
import shlex
import shutil
import struct
import subprocess
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ebpf.identity import Verdict
from stockade.backends.ebpf.loader import Current
from stockade.backends.ebpf.netlink import links
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import IptablesVariant
from stockade.backends.iptables.render import render_iptables
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.render import render_nftables
from stockade.backends.wireguard import SOCKET_MARK, STEER_MARK
from stockade.compiler.ir import Direction
from stockade.errors import UnmodelledConstructError
from stockade.lab.wglab import Capture, Host, WgLab, marker, probe, send_udp, wg_lab
from stockade.model.addresses import IPAddress
from stockade.verify.prove import Difference, Proof, prove
from stockade.verify.readback import prove_backend, read_iptables, read_nftables
from stockade.verify.samples import random_host_policy
from tests.kernel.test_wireguard import base_policy, labels

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                       reason="needs wireguard-go and wireguard-tools"),
]


def _hints(lab: WgLab) -> list[IPAddress]:
    return [a for h in lab.hosts.values() for a in (h.v4, h.v6)]


def _prove(lab: WgLab, name: str) -> Proof:
    proof = prove_backend(lab.policies[name], lab.hosts[name].backend, hints=_hints(lab))
    assert proof is not None
    return proof


def _first(proof: Proof, direction: Direction, version: int = 4) -> Difference:
    assert not proof.proven, "the mutant was proven equal"
    found = [d for d in proof.differences if d.packet.direction is direction and d.packet.family.value == version]
    assert found, proof.summary()
    return found[0]


def _syn_seen(cap: Capture, dst: IPAddress, port: int) -> bool:
    """A clear-text IPv4 TCP SYN to ``dst:port`` crossed the bridge."""
    raw = dst.packed
    for f in list(cap.frames):
        if f[12:14] != b"\x08\x00" or f[23] != 6 or f[30:34] != raw:
            continue
        ihl = (f[14] & 0x0F) * 4
        tcp = f[14 + ihl:]
        if int.from_bytes(tcp[2:4], "big") == port and tcp[13] & 0x12 == 0x02:
            return True
    return False


def _ebpf(h: Host) -> EbpfBackend:
    assert isinstance(h.backend, EbpfBackend)
    return h.backend


def _plain_entries(h: Host, direction: int, proto: int) -> int:
    """Every allow-encrypted policy entry of ``direction`` and ``proto`` made a plain allow."""
    loader = _ebpf(h).loader
    cur = loader.current()
    assert cur is not None
    trie = loader.trie(cur.generation)
    assert trie is not None
    n = 0
    with trie:
        for key, value in list(trie.items()):
            verdict, rule = struct.unpack("=II", value)
            if key[4] == 1 and key[9] == direction and key[10] == proto and verdict == Verdict.ALLOW_ENCRYPTED.value:
                trie.update(key, struct.pack("=II", Verdict.ALLOW.value, rule))
                n += 1
    return n


def _set_current(h: Host, **fields: int) -> Current:
    loader = _ebpf(h).loader
    cur = loader.current()
    assert cur is not None
    loader.set_current(replace(cur, **fields))  # type: ignore[arg-type]
    return cur


def _settle(lab: WgLab, name: str) -> None:
    """Restore ``name``'s policy and check it is proven again."""
    lab.hosts[name].enforce(lab.policies[name])
    proof = _prove(lab, name)
    assert proof.proven, proof.summary()


def test_encrypted_rules_proven_on_ebpf_and_tunnel_mutants_confirmed(tmp_path: Path) -> None:
    with wg_lab(3, tmp_path, "ebpf") as lab:
        lab.apply(base_policy(lab, labels(h0="web", h1="db", h2="other")))
        web, db = lab.hosts["h0"], lab.hosts["h1"]
        cap = lab.capture
        assert cap is not None
        for name in lab.hosts:
            proof = _prove(lab, name)
            assert proof.proven, f"{name}: {proof.summary()}"
            assert any("the tunnel is" in n for n in proof.notes), proof.notes
        assert probe(web.netns, web.v4, db.v4, 5432, marker())  # the tunnel carries it

        # 1. db: the encrypted udp/5432 from web made a plain allow -> accepted in the clear
        before = marker()
        send_udp(web.netns, web.v4, db.v4, 5432, before, mark=SOCKET_MARK)  # past web's steering, in the clear
        assert _plain_entries(db, 0, 17) > 0
        d = _first(_prove(lab, "h1"), Direction.INBOUND)
        assert (d.packet.l4proto, d.packet.dport, d.packet.tunnel) == (17, 5432, False)
        assert (d.policy_accepts, d.kernel_accepts) == (False, True) and d.packet.src == web.v4
        after = marker()
        send_udp(web.netns, d.packet.src, d.packet.dst, d.packet.dport, after, mark=SOCKET_MARK)
        received = lab.servers[1].datagrams
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and after not in received:
            time.sleep(0.01)
        assert after in received and before not in received  # confirmed: the plaintext now gets in
        _settle(lab, "h1")

        # 2. web: the tunnel index pointed at web's Ethernet interface -> sent in the clear
        eth = next(x.index for x in links(web.netns) if x.name == "eth0")
        _set_current(web, wg_ifindex=eth)
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        got = (d.packet.dport, d.packet.tunnel, d.policy_accepts, d.kernel_accepts)
        assert got == (5432, False, False, True), str(d)
        cap.clear()
        probe(web.netns, d.packet.src, d.packet.dst, d.packet.dport, marker(), timeout=0.3)
        assert _syn_seen(cap, d.packet.dst, d.packet.dport)  # confirmed: the SYN crossed the wire in the clear
        _settle(lab, "h0")

        # 3. web: no tunnel index -> the encrypted connection is dropped (never sent in the clear)
        _set_current(web, wg_ifindex=0)
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        assert (d.packet.dport, d.packet.tunnel, d.policy_accepts, d.kernel_accepts) == (5432, True, True, False)
        cap.clear()
        assert not probe(web.netns, d.packet.src, d.packet.dst, d.packet.dport, marker(), timeout=0.4)
        assert not _syn_seen(cap, d.packet.dst, d.packet.dport)  # confirmed: dropped, not in the clear
        _settle(lab, "h0")

        # 4. web: wireguard-go's fwmark pass removed -> its own packets meet the policy (dropped)
        _set_current(web, wg_mark=0)
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        assert d.packet.socket_mark and (d.policy_accepts, d.kernel_accepts) == (True, False), str(d)
        assert d.packet.ct_state == "new" and d.packet.l4proto == 6, str(d)
        cap.clear()  # a new connection carrying wireguard-go's mark: dropped at web, never on the wire
        probe(web.netns, web.v4, db.v4, d.packet.dport, marker(), mark=SOCKET_MARK, timeout=0.3)
        assert not _syn_seen(cap, db.v4, d.packet.dport)
        _settle(lab, "h0")
        cap.clear()  # the control: restored, the same SYN leaves in the clear (the fwmark passes)
        probe(web.netns, web.v4, db.v4, d.packet.dport, marker(), mark=SOCKET_MARK, timeout=0.3)
        assert _syn_seen(cap, db.v4, d.packet.dport)

        # refused: an fwmark that is not wireguard-go's; the tunnel's programs detached
        _set_current(web, wg_mark=0x1234)
        with pytest.raises(UnmodelledConstructError, match="fwmark 0x1234"):
            _prove(lab, "h0")
        _settle(lab, "h0")
        loader = _ebpf(web).loader
        loader._tc(["filter", "del", "dev", web.device.name, "ingress", "pref", str(loader.pref), "handle", "1",
                    "bpf"])
        with pytest.raises(UnmodelledConstructError, match="runs no Stockade program"):
            _prove(lab, "h0")


def _nft(netns: str, *args: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *args], capture_output=True, text=True,
                          check=True).stdout


def _delete_rule(netns: str, chain: str, *contains: str) -> str:
    """Delete the first rule of ``chain`` (table inet stockade) whose text has all of ``contains``."""
    for line in _nft(netns, "-a", "list", "chain", "inet", "stockade", chain).splitlines():
        if all(c in line for c in contains) and "# handle" in line:
            _nft(netns, "delete", "rule", "inet", "stockade", chain, "handle", line.rsplit("# handle", 1)[1].strip())
            return line.strip()
    raise AssertionError(f"no rule with {contains!r} in {chain}")


def _chain_with(netns: str, *contains: str) -> str:
    """The chain of table inet stockade holding a rule with all of ``contains``."""
    chain = ""
    for line in _nft(netns, "list", "table", "inet", "stockade").splitlines():
        if line.strip().startswith("chain "):
            chain = line.split()[1]
        elif all(c in line for c in contains):
            return chain
    raise AssertionError(f"no rule with {contains!r}")


def test_encrypted_rules_proven_on_nftables_and_tunnel_mutants_confirmed(tmp_path: Path) -> None:
    with wg_lab(3, tmp_path, "nftables") as lab:
        lab.apply(base_policy(lab, labels(h0="web", h1="db", h2="other")))
        web, db = lab.hosts["h0"], lab.hosts["h1"]
        cap = lab.capture
        assert cap is not None
        for name in lab.hosts:
            proof = _prove(lab, name)
            assert proof.proven, f"{name}: {proof.summary()}"
        assert probe(web.netns, web.v4, db.v4, 5432, marker())

        # 1. web: the steering of tcp/5432 to db removed -> the connection is dropped, not sent in the clear
        _delete_rule(web.netns, "steer", "tcp dport 5432 ip daddr")
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        got = (d.packet.dport, d.packet.tunnel, d.policy_accepts, d.kernel_accepts)
        assert got == (5432, True, True, False), str(d)
        cap.clear()
        assert not probe(web.netns, d.packet.src, d.packet.dst, d.packet.dport, marker(), timeout=0.4)
        assert not _syn_seen(cap, d.packet.dst, d.packet.dport)  # confirmed: dropped at web
        _settle(lab, "h0")

        # 2. web: the postrouting guard removed, and the policy route gone (as a dead tunnel leaves it)
        _delete_rule(web.netns, "postrouting", "oifname")
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        assert not d.packet.route_ok and not d.packet.tunnel, str(d)
        assert (d.policy_accepts, d.kernel_accepts) == (False, True), str(d)
        subprocess.run(["ip", "netns", "exec", web.netns, "ip", "rule", "del", "fwmark", hex(STEER_MARK)],
                       check=True)
        cap.clear()
        probe(web.netns, web.v4, db.v4, d.packet.dport, marker(), timeout=0.3)
        assert _syn_seen(cap, db.v4, d.packet.dport)  # confirmed: the marked SYN left in the clear
        web.device.remove()  # the next apply restores device, route and guard
        _settle(lab, "h0")

        # 3. db: the input guard removed -> a packet of an encrypted connection is accepted in the clear
        # (not sent for real: that needs a forged in-window segment of a live encrypted connection)
        _delete_rule(db.netns, "input", "ct mark", 'iifname != "')
        d = _first(_prove(lab, "h1"), Direction.INBOUND)
        assert d.packet.encrypted_connection and not d.packet.tunnel, str(d)
        assert (d.policy_accepts, d.kernel_accepts) == (False, True), str(d)
        _settle(lab, "h1")

        # 4. db: the clear-text drop of the encrypted inbound rule removed -> plaintext accepted
        chain = _chain_with(db.netns, 'iifname != "', "stk:d:ruleset")
        before = marker()
        send_udp(web.netns, web.v4, db.v4, 5432, before, mark=SOCKET_MARK)
        _delete_rule(db.netns, chain, 'iifname != "', "stk:d:ruleset")
        d = _first(_prove(lab, "h1"), Direction.INBOUND)
        got = (d.packet.dport, d.packet.tunnel, d.policy_accepts, d.kernel_accepts)
        assert got == (5432, False, False, True) and d.packet.src == web.v4, str(d)
        # confirmed on the same rule's udp/5432 (its one verdict chain serves tcp and udp): a datagram
        # from web sent past its steering (wireguard-go's mark) in the clear now reaches db's server
        # (a TCP echo would need db's reply, which its steering sends back through the tunnel)
        m = marker()
        send_udp(web.netns, d.packet.src, d.packet.dst, d.packet.dport, m, mark=SOCKET_MARK)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and m not in lab.servers[1].datagrams:
            time.sleep(0.01)
        assert m in lab.servers[1].datagrams and before not in lab.servers[1].datagrams
        _settle(lab, "h1")

        # equivalent: the outbound clear-text drop removed while the steering is intact (every packet
        # the rule matches was marked by the steering chain): proven equal
        chain = _chain_with(web.netns, "meta mark != 0x00005745")
        _delete_rule(web.netns, chain, "meta mark != 0x00005745")
        proof = _prove(lab, "h0")
        assert proof.proven, proof.summary()
        _settle(lab, "h0")

        # refused: a mark the model does not know
        _nft(web.netns, "insert", "rule", "inet", "stockade", "output", "meta", "mark", "0x1234", "accept")
        with pytest.raises(UnmodelledConstructError, match="packet mark 0x1234"):
            _prove(lab, "h0")


def _ipt_delete(netns: str, tool: str, table: str, *contains: str) -> str:
    """Delete the first rule of ``table`` (IPv4) whose ``-S`` line has all of ``contains``."""
    listing = subprocess.run(["ip", "netns", "exec", netns, tool, "-t", table, "-S"], capture_output=True, text=True,
                             check=True).stdout
    for line in listing.splitlines():
        if line.startswith("-A ") and all(c in line for c in contains):
            spec = shlex.split(line)
            subprocess.run(["ip", "netns", "exec", netns, tool, "-t", table, "-D", *spec[1:]], check=True)
            return line
    raise AssertionError(f"no {table} rule with {contains!r}")


@pytest.mark.parametrize("backend", ["iptables-legacy", "iptables-nft"])
def test_encrypted_rules_proven_on_iptables_and_tunnel_mutants_confirmed(tmp_path: Path, backend: str) -> None:
    tool = backend  # iptables-legacy / iptables-nft
    with wg_lab(3, tmp_path, backend) as lab:
        lab.apply(base_policy(lab, labels(h0="web", h1="db", h2="other")))
        web, db = lab.hosts["h0"], lab.hosts["h1"]
        cap = lab.capture
        assert cap is not None
        for name in lab.hosts:
            proof = _prove(lab, name)
            assert proof.proven, f"{name}: {proof.summary()}"
        assert probe(web.netns, web.v4, db.v4, 5432, marker())

        # 1. web: the mangle steering of tcp/5432 removed -> dropped by the filter's guard, never in the clear
        _ipt_delete(web.netns, tool, "mangle", "--dport 5432", "-p tcp", "-j MARK")
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        got = (d.packet.dport, d.packet.tunnel, d.policy_accepts, d.kernel_accepts)
        assert got == (5432, True, True, False), str(d)
        cap.clear()
        assert not probe(web.netns, d.packet.src, d.packet.dst, d.packet.dport, marker(), timeout=0.4)
        assert not _syn_seen(cap, d.packet.dst, d.packet.dport)  # confirmed: dropped at web
        _settle(lab, "h0")

        # 2. web: the mangle POSTROUTING guard removed, and the policy route gone
        _ipt_delete(web.netns, tool, "mangle", "failsafe:encrypted")
        d = _first(_prove(lab, "h0"), Direction.OUTBOUND)
        assert not d.packet.route_ok and not d.packet.tunnel, str(d)
        assert (d.policy_accepts, d.kernel_accepts) == (False, True), str(d)
        subprocess.run(["ip", "netns", "exec", web.netns, "ip", "rule", "del", "fwmark", hex(STEER_MARK)],
                       check=True)
        cap.clear()
        probe(web.netns, web.v4, db.v4, d.packet.dport, marker(), timeout=0.3)
        assert _syn_seen(cap, db.v4, d.packet.dport)  # confirmed: the marked SYN left in the clear
        web.device.remove()  # the next apply restores device, route and guard
        _settle(lab, "h0")

        # 3. db: the clear-text drop of the encrypted inbound rule removed -> plaintext accepted
        before = marker()
        send_udp(web.netns, web.v4, db.v4, 5432, before, mark=SOCKET_MARK)
        _ipt_delete(db.netns, tool, "filter", f"! -i {db.device.name}", "-p udp", "-j DROP")
        d = _first(_prove(lab, "h1"), Direction.INBOUND)
        assert (d.packet.dport, d.packet.tunnel, d.policy_accepts, d.kernel_accepts) == (5432, False, False, True)
        m = marker()  # confirmed: a datagram from web past its steering, in the clear, reaches db's server
        send_udp(web.netns, web.v4, db.v4, 5432, m, mark=SOCKET_MARK)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and m not in lab.servers[1].datagrams:
            time.sleep(0.01)
        assert m in lab.servers[1].datagrams and before not in lab.servers[1].datagrams


RANDOM_ENCRYPTED = 50


@pytest.mark.parametrize("backend", ["nftables", "iptables-legacy", "iptables-nft"])
def test_random_encrypted_policies_loaded_are_proven(backend: str) -> None:
    """Random policies with encrypted allows (their rules only: no tunnel needed to load them) in one
    namespace, read back with the WireGuard interface's name and proven."""
    ns = f"stk-vwg-{uuid.uuid4().hex[:8]}"
    wg = f"wgr{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        nft_backend = NftablesBackend("stkvwg", netns=ns) if backend == "nftables" else None
        variant = IptablesVariant.LEGACY if backend == "iptables-legacy" else IptablesVariant.NFT
        ipt_backend = IptablesBackend(netns=ns, variant=variant) if nft_backend is None else None
        rng = random.Random(4242)
        proven = 0
        while proven < RANDOM_ENCRYPTED:
            hp = random_host_policy(rng, encrypted=0.5)
            if hp.wireguard is None:
                continue
            if nft_backend is not None:
                nft_backend.apply(render_nftables(hp, "stkvwg", wg_interface=wg))
                loaded = read_nftables("stkvwg", ns, wg)
            else:
                assert ipt_backend is not None
                ipt_backend.apply(render_iptables(hp, variant=variant, wg_interface=wg))
                loaded = read_iptables(variant, ns, wg)
            proof = prove(hp, loaded)
            assert proof.proven, f"policy {proven}: {proof.summary()}"
            proven += 1
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
