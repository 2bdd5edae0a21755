"""The in-namespace half of the kernel lab: small servers plus a parallel prober.

Started by ``Lab`` as ``ip netns exec NS python -I nsagent.py --name HOST --tcp .. --udp ..``,
one process per lab host. It must stay standard-library only (it is run by path,
without importing the ``stockade`` package, so it starts fast).

* Servers: every TCP port answers each connection with ``HOST\\n`` and closes; every
  UDP port echoes each datagram back. Both on IPv4 and IPv6.
* SCTP without an SCTP stack: the lab kernel has netfilter's SCTP match and conntrack but no
  SCTP sockets (no ``CONFIG_IP_SCTP``), so SCTP travels over raw IP sockets (protocol 132). A
  probe sends an INIT chunk (random initiate tag, CRC32c) to the destination port; the server
  answers an INIT to a served port with an INIT-ACK carrying that tag as its verification tag,
  exactly as a stack's first reply would (conntrack tracks the pair as an SCTP association); an
  INIT to a port not served gets an ABORT (refused).
  Without a socket for the protocol the kernel would answer ICMP protocol-unreachable; the raw
  socket suppresses that, so a dropped INIT is silence (timeout).
* Control protocol on stdin/stdout, one JSON object per line:
  ``{"op": "probe", "probes": [...]}`` -> ``{"results": [...]}``,
  ``{"op": "flush_conntrack"}`` -> ``{"ok": true}`` (or ``{"error": ...}``),
  ``{"op": "ping"}`` -> ``{"ok": true}``.
  The first line written is ``{"ready": true, ...}`` once every socket is bound.
  End of stdin ends the agent, so it never outlives the lab that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# ---- servers ------------------------------------------------------------------


def _listen(proto: int, family: int, port: int) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == socket.IPPROTO_TCP else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
    else:
        sock.bind(("0.0.0.0", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(512)
    sock.setblocking(False)
    return sock


def _serve(sel: selectors.DefaultSelector, banner: bytes) -> None:
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if key.data == "tcp":
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    conn.sendall(banner)
                conn.close()
            else:
                try:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data, peer)
                except OSError:
                    continue


# ---- SCTP over raw sockets ----------------------------------------------------

IPPROTO_SCTP = 132
SCTP_INIT, SCTP_INIT_ACK, SCTP_ABORT = 1, 2, 6


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def sctp_checksum(packet: bytes) -> bytes:
    """CRC32c of an SCTP packet whose checksum field is zero, as it goes on the wire (RFC 9260)."""
    c = 0xFFFFFFFF
    for b in packet:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return struct.pack("<I", c ^ 0xFFFFFFFF)


def sctp_packet(sport: int, dport: int, vtag: int, chunk_type: int, tag: int) -> bytes:
    """An SCTP packet with one INIT or INIT-ACK chunk (``tag``: its initiate tag)."""
    body = struct.pack("!IIHHI", tag, 65535, 1, 1, tag)  # initiate tag, a_rwnd, OS, MIS, initial TSN
    if chunk_type == SCTP_INIT_ACK:
        body += struct.pack("!HH", 7, 8) + b"stk!"  # state cookie parameter (mandatory in an INIT-ACK)
    chunk = struct.pack("!BBH", chunk_type, 0, 4 + len(body)) + body
    head = struct.pack("!HHI", sport, dport, vtag)
    return head + sctp_checksum(head + b"\0\0\0\0" + chunk) + chunk


def _sctp_payload(family: int, data: bytes) -> bytes:
    """The SCTP packet of a raw read: IPv4 raw sockets include the IP header, IPv6 ones do not."""
    return data[(data[0] & 0x0F) * 4:] if family == socket.AF_INET else data


def _sctp_socket(family: int) -> socket.socket:
    return socket.socket(family, socket.SOCK_RAW, IPPROTO_SCTP)


def _serve_sctp(sock: socket.socket, family: int, ports: frozenset[int]) -> None:
    while True:
        try:
            data, peer = sock.recvfrom(65535)
        except OSError:
            continue
        pkt = _sctp_payload(family, data)
        if len(pkt) < 32 or pkt[12] != SCTP_INIT:
            continue
        sport, dport = struct.unpack_from("!HH", pkt)
        (their_tag,) = struct.unpack_from("!I", pkt, 16)
        if dport in ports:
            reply = sctp_packet(dport, sport, their_tag, SCTP_INIT_ACK, 0x5170CADE)
        else:  # a closed port: ABORT with the T bit (the tag reflected), as an SCTP stack answers
            head = struct.pack("!HHI", dport, sport, their_tag)
            chunk = struct.pack("!BBH", SCTP_ABORT, 1, 4)
            reply = head + sctp_checksum(head + b"\0\0\0\0" + chunk) + chunk
        with contextlib.suppress(OSError):
            sock.sendto(reply, (peer[0], 0))


def probe_sctp(p: dict[str, Any]) -> tuple[str, str]:
    family = _family(p["dst"])
    tag = int.from_bytes(os.urandom(4), "big") | 1
    sport = 32768 + int.from_bytes(os.urandom(2), "big") % 28000
    with _sctp_socket(family) as s:
        s.bind((p["src"], 0))
        s.sendto(sctp_packet(sport, p["port"], 0, SCTP_INIT, tag), (p["dst"], 0))
        deadline = time.monotonic() + p["timeout"]
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            data, peer = s.recvfrom(65535)
            pkt = _sctp_payload(family, data)
            if peer[0] != p["dst"] or len(pkt) < 16:
                continue
            src, dst, vtag = struct.unpack_from("!HHI", pkt)
            if (src, dst, vtag) == (p["port"], sport, tag) and pkt[12] == SCTP_INIT_ACK:
                return "ok", "INIT-ACK"
            if (src, dst, vtag) == (p["port"], sport, tag) and pkt[12] == SCTP_ABORT:
                return "refused", "ABORT"


def start_servers(name: str, tcp_ports: list[int], udp_ports: list[int], sctp_ports: list[int] | None = None) -> None:
    if sctp_ports is not None:  # [] still answers every INIT with an ABORT (closed port)
        for family in (socket.AF_INET, socket.AF_INET6):
            sock = _sctp_socket(family)
            threading.Thread(target=_serve_sctp, args=(sock, family, frozenset(sctp_ports)), daemon=True).start()
    sel = selectors.DefaultSelector()
    for family in (socket.AF_INET, socket.AF_INET6):
        for port in tcp_ports:
            sel.register(_listen(socket.IPPROTO_TCP, family, port), selectors.EVENT_READ, "tcp")
        for port in udp_ports:
            sel.register(_listen(socket.IPPROTO_UDP, family, port), selectors.EVENT_READ, "udp")
    banner = (name + "\n").encode()
    threading.Thread(target=_serve, args=(sel, banner), daemon=True).start()


# ---- probes -------------------------------------------------------------------


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout", "no answer"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", str(exc)
    if isinstance(exc, OSError) and exc.errno in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EACCES,
        errno.EPERM,
        errno.EHOSTDOWN,
    ):
        return "unreachable", str(exc)
    return "error", f"{type(exc).__name__}: {exc}"


def probe_tcp(p: dict[str, Any]) -> tuple[str, str]:
    with socket.socket(_family(p["dst"]), socket.SOCK_STREAM) as s:
        s.settimeout(p["timeout"])
        s.bind((p["src"], 0))
        s.connect((p["dst"], p["port"]))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    answer = data.decode(errors="replace").strip()
    if answer != p["expect"]:
        return "error", f"connected, but banner {answer!r} (expected {p['expect']!r})"
    return "ok", "banner " + answer


def probe_udp(p: dict[str, Any]) -> tuple[str, str]:
    token = os.urandom(12)
    with socket.socket(_family(p["dst"]), socket.SOCK_DGRAM) as s:
        s.settimeout(p["timeout"])
        s.bind((p["src"], 0))
        s.connect((p["dst"], p["port"]))
        s.send(token)
        deadline = time.monotonic() + p["timeout"]
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            if s.recv(2048) == token:
                return "ok", "echoed"


def probe_icmp(p: dict[str, Any]) -> tuple[str, str]:
    family = _family(p["dst"])
    v6 = family == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request, reply = (128, 129) if v6 else (8, 0)
    payload = os.urandom(16)
    seq = int.from_bytes(os.urandom(2), "big")
    # A ping socket: the kernel fills in the identifier and the checksum.
    with socket.socket(family, socket.SOCK_DGRAM, proto) as s:
        s.bind((p["src"], 0))
        s.sendto(struct.pack("!BBHHH", request, 0, 0, 0, seq) + payload, (p["dst"], 0))
        deadline = time.monotonic() + p["timeout"]
        while True:
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            data = s.recv(2048)
            matches = len(data) >= 8 and data[0] == reply and data[6:8] == seq.to_bytes(2, "big")
            if matches and data[8:] == payload:
                return "ok", "echo reply"


PROBERS = {"tcp": probe_tcp, "udp": probe_udp, "sctp": probe_sctp, "icmp-echo": probe_icmp}


def run_probe(p: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        outcome, detail = PROBERS[p["kind"]](p)
    except Exception as exc:  # every failure is a result, never a crash
        outcome, detail = _classify(exc)
    return {"id": p["id"], "outcome": outcome, "detail": detail, "ms": (time.monotonic() - start) * 1000}


def run_batch(probes: list[dict[str, Any]], pool: ThreadPoolExecutor) -> list[dict[str, Any]]:
    return list(pool.map(run_probe, probes))


# ---- conntrack --------------------------------------------------------------------

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2


def flush_conntrack() -> None:
    """Delete every conntrack entry of this namespace (both families), over ctnetlink."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(2.0)
        s.bind((0, 0))
        body = struct.pack("!BBH", socket.AF_UNSPEC, 0, 0)  # nfgenmsg: family, version, res_id
        msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        header = struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
        s.send(header + body)
        answer = s.recv(65536)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", answer)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", answer, 16)
        if code not in (0, -errno.ENOENT):
            raise OSError(-code, os.strerror(-code))


# ---- main loop --------------------------------------------------------------------


def _write(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _enable_ping_sockets() -> None:
    with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
        f.write("0 2147483647\n")


def _ports(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", default="")
    parser.add_argument("--udp", default="")
    parser.add_argument("--sctp", default="")
    parser.add_argument("--workers", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        _enable_ping_sockets()
        start_servers(args.name, _ports(args.tcp), _ports(args.udp), _ports(args.sctp) if args.sctp else None)
    except OSError as exc:
        _write({"error": f"agent {args.name}: {exc}"})
        return 1
    _write({"ready": True, "pid": os.getpid(), "name": args.name})
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            op = request.get("op")
            try:
                if op == "probe":
                    _write({"results": run_batch(request["probes"], pool)})
                elif op == "flush_conntrack":
                    flush_conntrack()
                    _write({"ok": True})
                elif op == "ping":
                    _write({"ok": True})
                else:
                    _write({"error": f"unknown op {op!r}"})
            except Exception as exc:
                _write({"error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
