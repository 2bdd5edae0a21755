"""WireGuard (``encrypt: true``) cost, side by side in one run, on this machine's wireguard-go.

Two namespaces on a bridge with the real policy: tcp/80 allowed in the clear, tcp/5432
encrypted, steered by each backend of ``--backends`` (nftables; iptables+ipset in its nft and
legacy variants; eBPF, whose tc programs redirect encrypted connections into the WireGuard
interface). ``--rounds N`` interleaves the backends N times and prints medians, with the load
average (the machine is shared). Measures

* per backend: TCP throughput (one stream, 64 KiB writes, ``--seconds`` each) plain vs
  encrypted, and TCP connection setup rate (connect + 1 byte echo + close, sequential);
* a peer change at a peer (a key rotation): the peer delta over UAPI vs a full apply of the
  host's policy (what a peer change cost before peer deltas);
* handshake time of a new peer: both sides get the peer (one UAPI call each), time until the
  first connection through the tunnel completes (includes WireGuard's 1-RTT handshake);
* cost of one peer add and one peer remove with 10 and 1,000 peers, through the UAPI socket
  (wireguard-go's configurator) and through the ``wg`` tool (the kernel module's configurator,
  which talks genetlink to a kernel device and the same UAPI socket to wireguard-go here), interleaved.

Run as root: ``python bench/wireguard.py`` (needs wireguard-go, wireguard-tools, nftables).
Prints one table. The kernel module is not available here; public figures (WireGuard's own
performance page, Cloudflare/Tailscale write-ups) put in-kernel WireGuard at several times
wireguard-go's single-stream throughput on equal hardware without GSO/GRO offloads, and about
equal to it with Tailscale's offload patches — treat the encrypted column as the userspace floor.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import socket
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from stockade.backends.common import in_netns
from stockade.backends.wgconf import UapiConfigurator, WgToolConfigurator
from stockade.compiler.delta import peer_delta
from stockade.compiler.ir import WireGuardPeer
from stockade.lab.wglab import WG_BACKENDS, marker, probe, wg_lab
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.rules import AllowRule, Ruleset
from stockade.model.selectors import LabelSelector
from stockade.model.services import Proto, Service, ServiceEntry


def _policy(lab_workloads: tuple[object, ...]) -> Policy:
    def app(v: str) -> LabelSelector:
        return LabelSelector((Label("app", v),))

    services = (Service("http", (ServiceEntry(Proto.TCP, 80, 80),)),
                Service("pg", (ServiceEntry(Proto.TCP, 5432, 5432),)),
                Service("bulk", (ServiceEntry(Proto.TCP, 9000, 9000), ServiceEntry(Proto.TCP, 9001, 9001))))
    rs = Ruleset("bench", (LabelSelector(),), (
        AllowRule((app("c"),), (app("s"),), ("http",)),
        AllowRule((app("c"),), (app("s"),), ("pg",), encrypt=True),
        AllowRule((app("c"),), (app("s"),), ("bulk",)),
    ))
    return Policy(workloads=lab_workloads, services=services, rulesets=(rs,))  # type: ignore[arg-type]


def _sink_server(netns: str, port: int) -> tuple[socket.socket, threading.Thread]:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(8)
        return s

    srv = in_netns(netns, make)

    def run() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while conn.recv(1 << 20):
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def throughput(netns: str, dst: str, port: int, seconds: float) -> float:
    """MB/s of one TCP stream."""
    s = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    s.connect((dst, port))
    buf = os.urandom(1 << 16)
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        sent += s.send(buf)
    s.close()
    return sent / (time.monotonic() - start) / 1e6


def conn_rate(netns: str, src: object, dst: object, port: int, seconds: float) -> float:
    n = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        assert probe(netns, src, dst, port, b"x", timeout=2.0)  # type: ignore[arg-type]
        n += 1
    return n / (time.monotonic() - start)


def _fake_peer(i: int) -> WireGuardPeer:
    addr = ipaddress.ip_address(f"10.{200 + i // 65536}.{(i // 256) % 256}.{i % 256}")
    return WireGuardPeer(f"fake{i}", base64.b64encode(os.urandom(32)).decode(), addr, 51820,
                         (ipaddress.ip_network(f"{addr}/32"),))


def backend_rows(backend: str, seconds: float, uapi_rows: bool) -> list[tuple[str, str, str]]:
    """Throughput and connection rate through ``backend``'s steering; with ``uapi_rows`` the UAPI rows too."""
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, wg_lab(2, Path(tmp), backend) as lab:
        c, s = lab.hosts["h0"], lab.hosts["h1"]
        labels = {"h0": frozenset({Label("app", "c")}), "h1": frozenset({Label("app", "s")})}
        lab.apply(_policy(lab.workloads(labels)))
        assert probe(c.netns, c.v4, s.v4, 5432, marker(), timeout=2.0)
        for port in (9000, 9001):
            _sink_server(s.netns, port)
        # the encrypted bulk port: the same rule with encrypt on 9001 only
        enc_policy = _policy(lab.workloads(labels))
        rs = enc_policy.rulesets[0]
        enc_services = (*enc_policy.services, Service("bulk-enc", (ServiceEntry(Proto.TCP, 9001, 9001),)),
                        Service("bulk-plain", (ServiceEntry(Proto.TCP, 9000, 9000),)))
        rules = (rs.rules[0], rs.rules[1],
                 AllowRule(rs.rules[2].consumers, rs.rules[2].providers, ("bulk-plain",)),
                 AllowRule(rs.rules[2].consumers, rs.rules[2].providers, ("bulk-enc",), encrypt=True))
        lab.apply(replace(enc_policy, services=enc_services, rulesets=(replace(rs, rules=rules),)))
        plain_tp = throughput(c.netns, str(s.v4), 9000, seconds)
        enc_tp = throughput(c.netns, str(s.v4), 9001, seconds)
        rows.append((f"[{backend}] TCP throughput, one stream", f"{plain_tp:.0f} MB/s", f"{enc_tp:.0f} MB/s"))
        plain_cr = conn_rate(c.netns, c.v4, s.v4, 80, seconds)
        enc_cr = conn_rate(c.netns, c.v4, s.v4, 5432, seconds)
        rows.append((f"[{backend}] TCP connections/s (sequential)", f"{plain_cr:.0f}", f"{enc_cr:.0f}"))
        assert lab.compiler is not None
        # a peer's key rotates: what h1 does, as a peer delta (UAPI) and as a full apply (before)
        old_hp = lab.compiler.host_policy("h1")
        by_name = {w.name: w for w in lab.compiler.policy.workloads}
        ident = c.identity()
        rotated = replace(by_name["h0"], wireguard=replace(ident, public_key=_fake_peer(99999).public_key))
        lab.compiler.apply_changes([rotated])
        new_hp = lab.compiler.host_policy("h1")
        assert old_hp.wireguard is not None and new_hp.wireguard is not None
        delta = peer_delta(old_hp.wireguard, new_hp.wireguard)
        t0 = time.perf_counter()
        s.backend.apply_peer_delta(old_hp.wireguard, delta)
        t1 = time.perf_counter()
        s.enforce(new_hp)
        t2 = time.perf_counter()
        rows.append((f"[{backend}] a peer's key rotates, at the peer: peer delta / full apply", "-",
                     f"{(t1 - t0) * 1000:.2f} / {(t2 - t1) * 1000:.1f} ms"))
        lab.compiler.apply_changes([by_name["h0"]])
        s.enforce(lab.compiler.host_policy("h1"))
        if not uapi_rows:
            return rows

        # a new peer's handshake: drop and re-add the peer on both sides, time the first connection
        times = []
        for _ in range(5):
            cfg_c = lab.compiler.host_policy("h0").wireguard
            cfg_s = lab.compiler.host_policy("h1").wireguard
            assert cfg_c is not None and cfg_s is not None
            c.device.remove_peer(cfg_c.peers[0].public_key)
            s.device.remove_peer(cfg_s.peers[0].public_key)
            start = time.perf_counter()
            c.device.add_peer(cfg_c.peers[0])
            s.device.add_peer(cfg_s.peers[0])
            assert probe(c.netns, c.v4, s.v4, 5432, marker(), timeout=5.0)
            times.append((time.perf_counter() - start) * 1000)
        rows.append(("new peer: add both sides + first connection", "-", f"{statistics.median(times):.1f} ms"))

        # the same per-peer change through the UAPI socket (wireguard-go's configurator) and through
        # the `wg` tool (the kernel module's configurator: genetlink there, UAPI here), interleaved
        uapi = c.device.config if not c.device.wg_tool else UapiConfigurator(c.device.name)
        tool = WgToolConfigurator(c.device.name, c.netns)
        for count in (10, 1000):
            peers = [_fake_peer(i) for i in range(count)]
            bulk: dict[str, float] = {}
            for name, conf in (("wg tool", tool), ("UAPI", uapi)):  # a first start: all peers at once
                t0 = time.perf_counter()
                conf.change_peers(peers, [])
                bulk[name] = (time.perf_counter() - t0) * 1000
                if name == "wg tool":
                    conf.change_peers([], [p.public_key for p in peers])
            rows.append((f"{count} peers into the device at once (batched): UAPI / wg tool", "-",
                         f"{bulk['UAPI']:.1f} / {bulk['wg tool']:.1f} ms"))
            cost: dict[str, tuple[list[float], list[float]]] = {"UAPI": ([], []), "wg tool": ([], [])}
            for i in range(40):
                name, conf = (("UAPI", uapi), ("wg tool", tool))[i % 2]
                extra = _fake_peer(count + i)
                t0 = time.perf_counter()
                conf.set_peer(extra)
                t1 = time.perf_counter()
                conf.remove_peer(extra.public_key)
                t2 = time.perf_counter()
                cost[name][0].append((t1 - t0) * 1000)
                cost[name][1].append((t2 - t1) * 1000)
            # the tunnel with the real peer kept working throughout (no session reset)
            assert probe(c.netns, c.v4, s.v4, 5432, marker(), timeout=2.0)
            for name, (adds, removes) in cost.items():
                via = "UAPI socket" if name == "UAPI" else "wg tool (kernel path's configurator)"
                rows.append((f"one peer add / remove at {count} peers, {via}", "-",
                             f"{statistics.median(adds):.2f} / {statistics.median(removes):.2f} ms"))
            for p in peers:
                uapi.remove_peer(p.public_key)
    return rows


def _median_cell(cells: list[str]) -> str:
    """Median of each number in cells shaped alike ("12 MB/s", "1.33 / 40.5 ms", "-")."""
    parts = [c.split(" ") for c in cells]
    out = []
    for i, tok in enumerate(parts[0]):
        try:
            values = [float(p[i]) for p in parts]
        except (ValueError, IndexError):
            out.append(tok)
            continue
        decimals = len(tok.split(".")[1]) if "." in tok else 0
        out.append(f"{statistics.median(values):.{decimals}f}")
    return " ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over the backends; medians printed")
    ap.add_argument("--backends", default=",".join(WG_BACKENDS), help=f"comma-separated, of {', '.join(WG_BACKENDS)}")
    args = ap.parse_args()
    cells: dict[str, list[tuple[str, str]]] = {}
    loads: list[float] = []
    for r in range(args.rounds):
        for i, backend in enumerate(args.backends.split(",")):
            loads.append(os.getloadavg()[0])
            for name, plain, enc in backend_rows(backend, args.seconds, uapi_rows=i == 0 and r == 0):
                cells.setdefault(name, []).append((plain, enc))
    rows = [(name, _median_cell([c[0] for c in got]), _median_cell([c[1] for c in got])) for name, got in cells.items()]
    print(f"load average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f}, {args.rounds} round(s), "
          f"{os.cpu_count()} CPUs")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'plain':>12}  {'encrypted (wireguard-go)':>26}")
    for name, plain, enc in rows:
        print(f"{name:<{width}}  {plain:>12}  {enc:>26}")


if __name__ == "__main__":
    main()
