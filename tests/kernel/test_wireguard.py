"""``encrypt: true`` in the kernel: wireguard-go tunnels between namespaces, steered by every
Linux backend that encrypts (nftables; iptables+ipset, whose steering is the mangle table; eBPF,
whose tc programs redirect encrypted connections into the WireGuard interface).

Three hosts on one bridge, each with the backend under test (the tests are parametrised over
``WG_BACKENDS``, never copied) and its own wireguard-go interface, the policy compiled by
the real compiler. A capture on the bridge (the underlay)
shows what crosses the wire: an encrypted rule's payload never appears there (only UDP to the
WireGuard port does), another allowed rule's payload does; plaintext for the encrypted flow,
a forged source address (in the clear, or through another peer's tunnel) and blocked traffic
are dropped; tamper, revoke, relabel and re-address are followed within 1 s; and a small
differential of random ``encrypt`` flags agrees with the evaluator on verdict and encryption.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.common import in_netns
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.iptables.tunnel import TUNNEL_MSS
from stockade.backends.wireguard import SOCKET_MARK
from stockade.evaluator import Evaluator, Verdict
from stockade.lab.wglab import WG_BACKENDS, WG_TOOL, WgLab, kill_wireguard_go, marker, probe, send_udp, wg_lab
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.rules import AllowRule, Ruleset
from stockade.model.selectors import LabelSelector
from stockade.model.services import Proto, Service, ServiceEntry
from stockade.model.workloads import WireGuardIdentity

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                       reason="needs wireguard-go and wireguard-tools"),
]
backends = pytest.mark.parametrize("backend", WG_BACKENDS)
# the same scenarios once more with the kernel module's configurator (the `wg` tool) on wireguard-go
with_wg_tool = pytest.mark.parametrize("backend", [*WG_BACKENDS, "nftables" + WG_TOOL])


def app(value: str) -> LabelSelector:
    return LabelSelector((Label("app", value),))


def tcp(name: str, port: int) -> Service:
    return Service(name, (ServiceEntry(Proto.TCP, port, port),))


SERVICES = (tcp("web", 80), tcp("pg", 5432), tcp("s6000", 6000), tcp("s7000", 7000))
UDP_SERVICES = (Service("pg-udp", (ServiceEntry(Proto.UDP, 5432, 5432),)),
                Service("u7000", (ServiceEntry(Proto.UDP, 7000, 7000),)))


def labels(**apps: str) -> dict[str, frozenset[Label]]:
    return {name: frozenset({Label("app", value)}) for name, value in apps.items()}


def base_policy(lab: WgLab, apps: dict[str, frozenset[Label]], keyed: set[str] | None = None) -> Policy:
    """web -> db: 5432 encrypted, 80 in the clear; other -> db: tcp/6000 and udp/5432 encrypted (its own
    tunnel, so a datagram it forges with web's address reaches db's WireGuard)."""
    rs = Ruleset("enc", (LabelSelector(),), (
        AllowRule((app("web"),), (app("db"),), ("pg", "pg-udp"), encrypt=True),
        AllowRule((app("web"),), (app("db"),), ("web", "u7000")),
        AllowRule((app("other"),), (app("db"),), ("s6000", "pg-udp"), encrypt=True),
    ))
    return Policy(workloads=lab.workloads(apps, keyed), services=SERVICES + UDP_SERVICES, rulesets=(rs,))


def until(predicate: object, limit: float = 1.0) -> float:
    """Seconds until ``predicate()`` holds (probing as fast as it answers); fails after ``limit``."""
    start = time.monotonic()
    while True:
        assert callable(predicate)
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            raise AssertionError(f"not within {limit} s")


@with_wg_tool
def test_encrypted_rule_on_the_wire_plaintext_and_spoofing_dropped(tmp_path: Path, backend: str) -> None:
    with wg_lab(3, tmp_path, backend) as lab:
        apps = labels(h0="web", h1="db", h2="other")
        lab.apply(base_policy(lab, apps))
        web, db, other = lab.hosts["h0"], lab.hosts["h1"], lab.hosts["h2"]
        cap = lab.capture
        assert cap is not None
        for h in lab.hosts.values():  # the backend's own read-back agrees with what it applied
            assert lab.compiler is not None
            assert h.backend.verify(h.backend.render(lab.compiler.host_policy(h.name))).ok

        for src, dst in ((web.v4, db.v4), (web.v6, db.v6)):
            # the encrypted rule: delivered, never seen in the clear, WireGuard UDP on the wire
            cap.clear()
            m = marker()
            assert probe(web.netns, src, dst, 5432, m)
            time.sleep(0.05)
            assert not cap.seen(m), f"{m!r} crossed the underlay in the clear"
            assert cap.wireguard_packets() > 0
            # another allowed rule between the same two hosts stays in the clear
            cap.clear()
            m = marker()
            assert probe(web.netns, src, dst, 80, m)
            time.sleep(0.05)
            assert cap.seen(m)
            # plaintext for the encrypted flow (the socket skips the steering): dropped by the provider
            assert not probe(web.netns, src, dst, 5432, marker(), mark=SOCKET_MARK, timeout=0.4)
        # IPv6 outside too: web and db register IPv6 endpoints; both inner families still go through
        assert lab.compiler is not None
        by_name = {w.name: w for w in lab.compiler.policy.workloads}
        lab.change([replace(by_name[h.name], wireguard=WireGuardIdentity(h.public_key, h.v6, 51820))
                    for h in (web, db)])
        for src, dst in ((web.v4, db.v4), (web.v6, db.v6)):
            cap.clear()
            m = marker()
            assert until(lambda: probe(web.netns, src, dst, 5432, m, timeout=0.3)) < 1.0  # noqa: B023
            time.sleep(0.05)
            assert not cap.seen(m) and cap.wireguard_packets(version=6) > 0
        # blocked stays blocked: nothing allows other -> db on 5432
        assert not probe(other.netns, other.v4, db.v4, 5432, marker(), timeout=0.4)
        assert probe(other.netns, other.v4, db.v4, 6000, marker())  # its own encrypted rule works

        # spoofing, with datagrams db records: web's own reach db (through the tunnel) ...
        received = lab.servers[1].datagrams
        genuine = [marker(), marker()]
        send_udp(web.netns, web.v4, db.v4, 5432, genuine[0])
        send_udp(web.netns, web.v6, db.v6, 5432, genuine[1])
        # ... forging web's address works where the policy allows plaintext (the control; the forger
        # skips its own firewall with wireguard-go's socket mark, as a compromised host would) ...
        control = marker()
        send_udp(other.netns, web.v4, db.v4, 7000, control, mark=SOCKET_MARK)
        # ... and is dropped for the encrypted rule: in the clear, and through other's own tunnel
        # (its policy steers udp/5432 to db; its key is not bound to web's address: WireGuard's
        # cryptokey routing drops it at db)
        forged = [marker(), marker(), marker()]
        send_udp(other.netns, web.v4, db.v4, 5432, forged[0], mark=SOCKET_MARK)
        send_udp(other.netns, web.v6, db.v6, 5432, forged[1], mark=SOCKET_MARK)
        send_udp(other.netns, web.v4, db.v4, 5432, forged[2])
        own = marker()  # other's own address through its own tunnel: delivered
        send_udp(other.netns, other.v4, db.v4, 5432, own)
        expected = {"genuine v4": genuine[0], "genuine v6": genuine[1], "forged control": control, "own": own}
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not all(m in received for m in expected.values()):
            time.sleep(0.01)
        assert [k for k, m in expected.items() if m not in received] == []
        time.sleep(0.2)
        assert not any(m in received for m in forged)
        assert not cap.seen(own) and not cap.seen(forged[2])  # those two went encrypted
        if isinstance(web.backend, EbpfBackend) and isinstance(db.backend, EbpfBackend):
            # eBPF: its programs carried it (redirected into the tunnel at web; the plaintext dropped at db)
            assert web.backend.stats()["tunneled"] > 0
            assert db.backend.stats()["plain_drop"] > 0


@with_wg_tool
def test_tamper_revoke_relabel_readdress_rotate_follow_within_1s(tmp_path: Path, backend: str) -> None:
    with wg_lab(3, tmp_path, backend) as lab:
        apps = labels(h0="web", h1="db", h2="other")
        policy = base_policy(lab, apps)
        lab.apply(policy)
        web, db, other = lab.hosts["h0"], lab.hosts["h1"], lab.hosts["h2"]
        cap = lab.capture
        assert cap is not None and lab.compiler is not None
        assert probe(web.netns, web.v4, db.v4, 5432, marker())

        # tamper: wireguard-go killed -> traffic dropped (never in the clear), verify sees it, restore
        kill_wireguard_go(web.netns)
        cap.clear()
        m = marker()
        assert not probe(web.netns, web.v4, db.v4, 5432, m, timeout=0.4)
        assert not cap.seen(m)
        expected = web.backend.render(lab.compiler.host_policy("h0"))
        assert not web.backend.verify(expected).ok
        web.backend.apply(expected)
        assert until(lambda: probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=0.3)) < 1.0
        # tamper: the interface deleted
        web.device.remove()
        assert not probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=0.3)
        web.backend.apply(expected)
        assert until(lambda: probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=0.3)) < 1.0

        by_name = {w.name: w for w in lab.compiler.policy.workloads}
        # revoke db's key: web loses the peer, the encrypted flow stops (and is not sent in clear)
        lab.change([replace(by_name["h1"], wireguard=None)])
        assert until(lambda: not probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=0.2)) < 1.0
        assert probe(web.netns, web.v4, db.v4, 80, marker())  # the plain rule is untouched
        lab.change([by_name["h1"]])  # re-registered
        assert until(lambda: probe(web.netns, web.v4, db.v4, 5432, marker(), timeout=0.3)) < 1.0

        # relabel other into the encrypted group (app=web): its 5432 now works, through the tunnel
        moved = replace(by_name["h2"], labels=frozenset({Label("app", "web")}))
        lab.change([moved])
        assert until(lambda: probe(other.netns, other.v4, db.v4, 5432, marker(), timeout=0.3)) < 1.0
        cap.clear()
        m = marker()
        assert probe(other.netns, other.v4, db.v4, 5432, m)
        time.sleep(0.05)
        assert not cap.seen(m)
        lab.change([by_name["h2"]])  # and out again
        assert until(lambda: not probe(other.netns, other.v4, db.v4, 5432, marker(), timeout=0.2)) < 1.0

        # re-address web (a new IPv4 address, same key): peers follow its endpoint and allowed IPs
        new_v4 = ipaddress.ip_address(str(web.v4).rsplit(".", 1)[0] + ".99")
        from stockade.lab.netns import run_ip
        run_ip(["-n", web.netns, "addr", "add", f"{new_v4}/32", "dev", "eth0"])
        run_ip(["-n", web.netns, "addr", "del", f"{web.v4}/32", "dev", "eth0"])
        from stockade.model.workloads import Interface
        w = by_name["h0"]
        readdressed = replace(w, interfaces=(Interface("eth0", (new_v4, web.v6)),),
                              wireguard=WireGuardIdentity(web.public_key, new_v4, 51820))
        lab.change([readdressed])
        assert until(lambda: probe(web.netns, new_v4, db.v4, 5432, marker(), timeout=0.3)) < 1.0
        # the old address, forged by other through its own tunnel, is no longer web's: dropped
        stale = marker()
        send_udp(other.netns, web.v4, db.v4, 5432, stale)

        # rotate web's key: a new private key on the host, the public key re-registered
        from stockade.lab.wglab import genkey
        key_file, pub = genkey(tmp_path, "h0-rotated")
        web.device.private_key_file = key_file
        started = time.monotonic()
        expected = web.backend.render(lab.compiler.host_policy("h0"))
        report = web.backend.verify(expected)  # the agent's read-back notices the new key file ...
        assert any("private key differs" in p for p in report.problems), report
        web.backend.apply(expected)  # ... and restores: the device loads it
        reloads, peer_deltas = lab.reloads, lab.peer_deltas
        lab.change([replace(readdressed, wireguard=WireGuardIdentity(pub, new_v4, 51820))])  # and registers it
        assert until(lambda: probe(web.netns, new_v4, db.v4, 5432, marker(), timeout=0.3)) < 1.0
        # the peers took the rotation as a peer delta over the control socket, no ruleset reload
        assert lab.reloads == reloads and lab.peer_deltas > peer_deltas
        assert time.monotonic() - started < 1.5
        assert stale not in lab.servers[1].datagrams


@backends
def test_differential_random_encrypt_flags(tmp_path: Path, backend: str) -> None:
    """Random rules over four ports with random encrypt flags: verdict and 'in the clear or not'
    of every probe equal the evaluator's."""
    rng = random.Random(20)
    probes = disagreements = 0
    with wg_lab(3, tmp_path, backend) as lab:
        names = ["h0", "h1", "h2"]
        cap = lab.capture
        assert cap is not None
        for _round in range(3):
            apps = labels(**{n: rng.choice(["a", "b"]) for n in names})
            rules = []
            for svc in SERVICES:
                if rng.random() < 0.8:
                    rules.append(AllowRule((app(rng.choice("ab")),), (app(rng.choice("ab")),), (svc.name,),
                                           encrypt=rng.random() < 0.5))
            keyed = {n for n in names if rng.random() < 0.85}
            policy = Policy(workloads=lab.workloads(apps, keyed), services=SERVICES,
                            rulesets=(Ruleset("r", (LabelSelector(),), tuple(rules)),))
            lab.apply(policy)
            ev = Evaluator(policy)
            for s in names:
                for d in names:
                    if s == d:
                        continue
                    src, dst = lab.hosts[s], lab.hosts[d]
                    for svc in SERVICES:
                        port = svc.entries[0].first
                        assert port is not None
                        want = ev.evaluate(src.v4, dst.v4, Proto.TCP, port)
                        cap.clear()
                        m = marker()
                        ok = probe(src.netns, src.v4, dst.v4, port, m, timeout=0.3)
                        time.sleep(0.02)
                        clear = cap.seen(m)
                        probes += 1
                        allowed = want.verdict is Verdict.ALLOWED
                        if ok != allowed or (ok and clear == want.encrypted):
                            disagreements += 1
                            print(f"DISAGREE {s}->{d}:{port} want {want} got ok={ok} clear={clear}")
    print(f"wireguard differential ({backend}): {probes} probes, {disagreements} disagreements")
    assert disagreements == 0


def _mss_sink(netns: str, port: int) -> tuple[socket.socket, list[tuple[int, int]]]:
    """A server that reads each connection to its end and answers with the byte count; records
    (bytes, the connection's MSS) of each."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", port))
        s.listen(4)
        return s

    srv = in_netns(netns, make)
    seen: list[tuple[int, int]] = []

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                n = 0
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(1 << 20):
                        n += len(chunk)
                    seen.append((n, conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)))
                    conn.sendall(n.to_bytes(8, "big"))

    threading.Thread(target=run, daemon=True).start()
    return srv, seen


@backends
def test_a_bulk_transfer_through_the_tunnel_with_the_tunnels_mss(tmp_path: Path, backend: str) -> None:
    """4 MiB through an encrypted rule, both families: delivered whole, and the connection's SYNs
    carried the tunnel's MSS (clamped when they were steered: the sockets sized segments for the
    Ethernet link), never in the clear."""
    with wg_lab(2, tmp_path, backend) as lab:
        apps = {"h0": frozenset({Label("app", "web")}), "h1": frozenset({Label("app", "db")})}
        bulk = Service("bulk", (ServiceEntry(Proto.TCP, 9001, 9001),))
        rs = Ruleset("bulk", (LabelSelector(),), (AllowRule((app("web"),), (app("db"),), ("bulk",), encrypt=True),))
        lab.apply(Policy(workloads=lab.workloads(apps), services=(bulk,), rulesets=(rs,)))
        web, db = lab.hosts["h0"], lab.hosts["h1"]
        srv, seen = _mss_sink(db.netns, 9001)
        cap = lab.capture
        assert cap is not None
        m = marker()
        payload = m * ((4 << 20) // len(m))
        try:
            for src, dst in ((web.v4, db.v4), (web.v6, db.v6)):
                family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
                s = in_netns(web.netns, lambda f=family: socket.socket(f, socket.SOCK_STREAM))  # type: ignore[misc]
                s.settimeout(10)
                with s:
                    s.bind((str(src), 0))
                    s.connect((str(dst), 9001))
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    assert int.from_bytes(s.recv(8), "big") == len(payload)
            assert [n for n, _ in seen] == [len(payload)] * 2
            assert all(mss <= TUNNEL_MSS for _, mss in seen), seen
            assert not cap.seen(m)
        finally:
            srv.close()
