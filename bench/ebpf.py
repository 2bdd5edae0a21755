"""Benchmark: nftables and iptables (list and lookup layouts) vs eBPF, on a rules axis.

Run as root: ``python bench/ebpf.py`` (``--quick`` for smaller sizes and shorter runs;
``--rules 10,1000`` and ``--peers N`` to choose the axis; ``--no-iptables`` to leave iptables
out). A server and a client namespace on a veth pair (``bench/nft_apply.py``'s); the server
enforces ``nft_apply.host_policy(peers, rules)``: ``rules`` inbound allow rules over 50 peer
sets holding ``peers`` addresses, the client in the last set and allowed by the last rule (the
worst case for a rule list), plus udp/9000 on that rule for the packet test. Configurations:

* ``nft-list`` / ``nft-lookup`` (verdict maps, the default) and ``nft-lookup-nolog`` (the same
  ruleset with every ``log`` statement and the UDP log-once lines removed);
* ``ipt-list`` / ``ipt-lookup`` (iptables-legacy + ipset, the historic rule list and the
  default port index of chains), ``ipt-lookup-nolog`` (``flow_log=False``) and
  ``iptnft-lookup`` (the same through iptables-nft);
* ``ipt-ipset-tier``: the other iptables option the issue names, measured as a prototype: ONE
  ``hash:net,port`` set per tier holding every (peer address, proto:port) of its rules and one
  ``-m set --match-set tier src,dst -j RETURN`` line (no rule id, see the README);
* ``ebpf`` and ``none`` (the bare veth).

An NFLOG listener (group 100, counting messages) runs in the server namespace during the
traffic tests, as the agent's reader would, so logging costs what it costs with a reader. The
UDP sender is one-way, so every packet is a conntrack-NEW packet that walks the policy. Tables:

1. **load and delta**, per backend and rule count: render, *cold* apply (nothing installed
   before) and *warm* re-apply of the same policy (each best of N), one-peer delta (median and
   max of 40 add/remove);
2. **traffic**, per configuration and rule count: TCP connection setup rate of one Python
   client (every connect is a new flow: rule evaluation), and UDP packets/s received by the
   server from a C sender (``sendmmsg`` of 64-byte datagrams on one one-way flow: every packet
   NEW), with % of eBPF's rate at the same rule count and % of the configuration's own 10-rule
   rate; then the cost of logging (lookup vs lookup-nolog). Medians of interleaved rounds;
3. **eBPF programs**: instruction count (translated), JIT size, instructions the verifier
   processed and the load (verification) time, from ``bpf_prog_info`` and ``bpftool``.

Numbers on a shared 2-CPU machine are noisy: rounds are interleaved so background load hits
every configuration alike.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: reuse the nftables bench
import nft_apply
from ebpf_tools import Listener, build_tools
from nft_apply import CLI4, SRV4, Namespaces, connection_rate, timed

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import Layout as IptLayout
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.render import Layout, NftablesArtifact
from stockade.compiler.ir import HostPolicy, SetDelta
from stockade.model.addresses import Family
from stockade.model.services import Proto, ServiceEntry

UDP_PORT = 9000
RULE_COUNTS = (10, 100, 1_000, 5_000)
PEERS = 1_000
NOLOG = "nft-lookup-nolog"
_LOG_RE = re.compile(r'log prefix "[^"]*" group \d+ ')

def bench_policy(peers: int, rules: int) -> HostPolicy:
    """nft_apply's policy with udp/9000 added to the client's (last) rule."""
    hp = nft_apply.host_policy(peers, rules)
    last = hp.rules[-1]
    extra = (*last.services, ServiceEntry(Proto.UDP, UDP_PORT, UDP_PORT))
    return replace(hp, rules=(*hp.rules[:-1], replace(last, services=extra)))


Backend = NftablesBackend | IptablesBackend | EbpfBackend


def without_logging(artifact: NftablesArtifact) -> NftablesArtifact:
    """``artifact`` with no flow logging: log statements and the UDP log-once lines removed."""
    chains = tuple(
        replace(c, rules=tuple(_LOG_RE.sub("", r) for r in c.rules if "@flowlog_" not in r)) for c in artifact.chains
    )
    return replace(artifact, chains=chains)


def make_backends(ns: Namespaces, iptables: bool) -> dict[str, Backend]:
    out: dict[str, Backend] = {
        "nft-list": NftablesBackend(netns=ns.srv, layout=Layout.LIST),
        "nft-lookup": NftablesBackend(netns=ns.srv),
    }
    if iptables:
        out["ipt-list"] = IptablesBackend("legacy", netns=ns.srv, layout=IptLayout.LIST)
        out["ipt-lookup"] = IptablesBackend("legacy", netns=ns.srv)
        out["iptnft-lookup"] = IptablesBackend("nft", netns=ns.srv)
    out["ebpf"] = EbpfBackend(netns=ns.srv)
    return out


class IpsetTier:
    """The ``hash:net,port`` option as a prototype (IPv4, allow tier only, no rule ids, no deltas
    through the backend API): one set per tier keyed on (peer address, proto:port), one line."""

    SET, CHAIN = "STKB-tier", "STKB-INPUT"

    def __init__(self, netns: str, old_reader: str | None = None) -> None:
        self.netns = netns
        self.old_reader = old_reader

    def _run(self, argv: list[str], stdin: str | None = None, check: bool = True) -> None:
        subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *argv], input=stdin, text=True,
                       capture_output=True, check=check)

    def render(self, hp: HostPolicy) -> tuple[str, str, int]:
        members = {(s.name, s.family): s.members for s in hp.sets}
        elements: list[str] = []
        for rule in hp.rules:
            for net in members[(rule.peer, Family.V4)]:
                for e in rule.services:
                    for port in range(e.first or 0, (e.last or e.first or 0) + 1):
                        elements.append(f"add {self.SET} {net},{e.proto.value}:{port}")
        sets = f"create {self.SET} hash:net,port family inet maxelem 4194304 -exist\nflush {self.SET}\n"
        sets += "\n".join(elements) + "\n"
        rules = (f"*filter\n:{self.CHAIN} - [0:0]\n"
                 f"-A {self.CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"
                 f"-A {self.CHAIN} -i lo -j RETURN\n"
                 f"-A {self.CHAIN} -m set --match-set {self.SET} src,dst -j RETURN\n"
                 f"-A {self.CHAIN} -j DROP\n-I INPUT 1 -j {self.CHAIN}\nCOMMIT\n")
        return sets, rules, len(elements)

    def apply(self, artifact: tuple[str, str, int]) -> None:
        self.remove()
        self._run(["ipset", "restore"], artifact[0])
        self._run(["iptables-legacy-restore", "--noflush"], artifact[1])

    def apply_delta(self, elements: list[str]) -> None:
        self._run(["ipset", "-exist", "restore"], "".join(e + "\n" for e in elements))

    def remove(self) -> None:
        self._run(["iptables-legacy", "-D", "INPUT", "-j", self.CHAIN], check=False)
        self._run(["iptables-legacy", "-F", self.CHAIN], check=False)
        self._run(["iptables-legacy", "-X", self.CHAIN], check=False)
        self._run(["ipset", "destroy", self.SET], check=False)


def measure_ipset_tier(ns: Namespaces, hp: HostPolicy, rules: int) -> str:
    """Load time, element count and a one-peer delta of the ``hash:net,port`` prototype."""
    proto = IpsetTier(ns.srv)
    artifact = proto.render(hp)
    cold = min(timed(lambda: proto.apply(artifact)) for _ in range(2))
    # a peer joining the last set: one element per (rule using that set, port)
    last = hp.sets[-1].name
    ports = [(e.proto.value, e.first) for r in hp.rules if r.peer == last for e in r.services]
    deltas = []
    for i in range(10):
        one = str(ipaddress.IPv4Address("203.0.113.0") + i)
        for op in ("add", "del"):
            lines = [f"{op} {IpsetTier.SET} {one},{p}:{n}" for p, n in ports]
            deltas.append(timed(lambda lines=lines: proto.apply_delta(lines)))
    proto.remove()
    return (f"{'ipt-ipset-tier':<18} {rules:>6,} {'':>9} {cold * 1e3:>13.1f} {'':>13} "
            f"{statistics.median(deltas) * 1e3:>9.3f} {max(deltas) * 1e3:>9.3f}   ({artifact[2]:,} set elements, "
            f"{len(ports)} per peer of the last set)")


# ---- load and delta -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoadRow:
    backend: str
    rules: int
    render_ms: float
    cold_ms: float
    warm_ms: float
    delta_ms: float
    delta_max_ms: float


def loadable(backend: Backend, hp: HostPolicy) -> Any:
    """The artifact with its loadable form computed: eBPF trie bytes, nftables/iptables text."""
    artifact: Any = backend.render(hp)
    if isinstance(backend, EbpfBackend):
        artifact.trie_items()
    else:
        artifact.to_text()
    return artifact


def measure_load(name: str, backend: Backend, hp: HostPolicy, rules: int, repeats: int) -> LoadRow:
    render_s = min(timed(lambda: loadable(backend, hp)) for _ in range(2))
    artifact = loadable(backend, hp)
    colds: list[float] = []
    for _ in range(repeats):  # best of N: the machine is shared, noise only ever adds time
        backend.remove()
        colds.append(timed(lambda: backend.apply(artifact)))
    cold = min(colds)
    warm = min(timed(lambda: backend.apply(artifact)) for _ in range(repeats))
    target = hp.sets[0].name
    deltas: list[float] = []
    for i in range(21):
        one = (ipaddress.IPv4Network((int(ipaddress.IPv4Address("203.0.113.0")) + i, 32)),)
        deltas.append(timed(lambda one=one: backend.apply_delta((SetDelta(target, Family.V4, one, ()),))))
        deltas.append(timed(lambda one=one: backend.apply_delta((SetDelta(target, Family.V4, (), one),))))
    deltas = deltas[2:]  # the first pair opens sockets / map descriptors
    report = backend.verify(artifact)
    assert report.ok, f"{name}: the kernel does not hold what was applied: {report.problems[:3]}"
    backend.remove()
    return LoadRow(name, rules, render_s * 1e3, cold * 1e3, warm * 1e3,
                   statistics.median(deltas) * 1e3, max(deltas) * 1e3)


# ---- traffic --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time a running process has had (schedstat, ns; softirq work done in its context included)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except OSError:
        return 0.0


def ksoftirqd_pids() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().startswith("ksoftirqd/"):
                    out.append(int(d.name))
            except OSError:
                continue
    return out


def run_measured(argv: list[str]) -> tuple[str, float]:
    """Run ``argv`` to the end: (stdout, its CPU seconds from wait4's rusage)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, out)
    return out, usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Sample:
    """One traffic test: rates, and CPU per connection / per packet of every process involved."""

    conns: float  # TCP connections/s
    pps: float  # UDP packets/s received
    cpu_conn_us: float  # (client + server + NFLOG reader + ksoftirqd) CPU per connection, microseconds
    cpu_pkt_us: float  # (sender + receiver + NFLOG reader + ksoftirqd) CPU per packet sent, microseconds


def measured_connections(ns: Namespaces, seconds: float, others: list[int]) -> tuple[float, float]:
    """(connections/s, CPU microseconds per connection) of one client against the server."""
    before = sum(cpu_seconds(p) for p in others)
    out, cpu = run_measured(["ip", "netns", "exec", ns.cli, sys.executable, "-c", nft_apply.CLIENT, SRV4,
                             str(seconds)])
    cpu += sum(cpu_seconds(p) for p in others) - before
    rate = float(out.split()[0])
    return rate, 1e6 * cpu / max(1.0, rate * seconds)


def packet_rate(ns: Namespaces, sender: Path, receiver: Path, seconds: float,
                others: list[int] | None = None) -> tuple[float, float]:
    """(packets/s received, CPU microseconds per packet sent) of the one-way UDP flow."""
    recv = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns.srv}", str(receiver), str(UDP_PORT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        before = sum(cpu_seconds(p) for p in others or [])
        sent, cpu = run_measured(["nsenter", f"--net=/run/netns/{ns.cli}", str(sender), SRV4, str(UDP_PORT),
                                  str(seconds)])
        out = recv.stdout.read()
        _, _, usage = os.wait4(recv.pid, 0)
        recv.returncode = 0
        cpu += usage.ru_utime + usage.ru_stime + sum(cpu_seconds(p) for p in others or []) - before
        return float(out.strip() or 0), 1e6 * cpu / max(1, int(sent.strip() or 0))
    finally:
        if recv.returncode is None and recv.poll() is None:
            recv.kill()
            recv.wait()


def reader_of(config: str) -> tuple[str, str]:
    """``nft-lookup/naive`` -> ("nft-lookup", "naive"); no suffix: the agent's reader; "/noreader": none."""
    name, _, reader = config.partition("/")
    return name, {"": "agent", "noreader": "none"}.get(reader, reader)


def measure_traffic(
    ns: Namespaces, backends: dict[str, Backend], rule_counts: tuple[int, ...], peers: int,
    tools: tuple[Path, Path], seconds: float, rounds: int, logging_only: bool = False,
    old_reader: str | None = None,
) -> dict[tuple[str, int], list[Sample]]:
    """(configuration, rules) -> the samples of its rounds; ("none", 0) is the bare veth.

    ``logging_only``: only the lookup layouts with and without logging, each logging one with
    the agent's reader, the naive reader (``/naive``) and no reader (``/noreader``); with
    ``old_reader`` (a path to another nflog.py) also ``/oldreader``.
    """
    artifacts: dict[tuple[str, int], tuple[Any, Any]] = {}
    tier = IpsetTier(ns.srv)
    quiet = {n: IptablesBackend("legacy", netns=ns.srv, flow_log=False) for n in ("ipt-lookup-nolog",)}
    for r in rule_counts:
        hp = bench_policy(peers, r)
        for n, b in backends.items():
            if not logging_only or n in ("nft-lookup", "ipt-lookup"):
                artifacts[(n, r)] = (b, b.render(hp))
        lookup = backends["nft-lookup"]
        artifacts[(NOLOG, r)] = (lookup, without_logging(artifacts[("nft-lookup", r)][1]))
        if "ipt-lookup" in backends:
            artifacts[("ipt-lookup-nolog", r)] = (quiet["ipt-lookup-nolog"], quiet["ipt-lookup-nolog"].render(hp))
            if not logging_only:
                artifacts[("ipt-ipset-tier", r)] = (tier, tier.render(hp))
        if logging_only:
            for n in ("nft-lookup", "ipt-lookup"):
                if (n, r) in artifacts:
                    for reader in ("naive", "noreader", *(("oldreader",) if old_reader else ())):
                        artifacts[(f"{n}/{reader}", r)] = artifacts[(n, r)]
    everyone: list[Any] = [*backends.values(), tier]
    server = subprocess.Popen(["ip", "netns", "exec", ns.srv, sys.executable, "-c", nft_apply.SERVER],
                              stdout=subprocess.PIPE, text=True)
    listener = Listener(ns.srv, old_reader)
    configs: list[tuple[str, int]] = [("none", 0), *sorted(artifacts, key=lambda c: (c[1], c[0]))]
    samples: dict[tuple[str, int], list[Sample]] = {c: [] for c in configs}
    softirqd = ksoftirqd_pids()
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        connection_rate(ns, 0.3)  # warm up
        for _ in range(rounds):
            for name, rules in configs:
                for other in everyone:
                    other.remove()
                listener.use(reader_of(name)[1])
                if name != "none":
                    backend, artifact = artifacts[(name, rules)]
                    backend.apply(artifact)
                subprocess.run(["ip", "netns", "exec", ns.srv, "conntrack", "-F"], capture_output=True, check=False)
                others = [server.pid, *softirqd, *listener.pids()]
                conns, cpu_conn = measured_connections(ns, seconds, others)
                pps, cpu_pkt = packet_rate(ns, tools[0], tools[1], seconds, [*softirqd, *listener.pids()])
                samples[(name, rules)].append(Sample(conns, pps, cpu_conn, cpu_pkt))
                print(f"  {name:<20} {rules:>6,} rules: {conns:>7,.0f} conn/s {cpu_conn:6.1f} us/conn "
                      f"{pps:>10,.0f} pkt/s {cpu_pkt:6.2f} us/pkt (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    finally:
        server.kill()
        server.wait()
        listener.stop()
        for b in everyone:
            b.remove()
    return samples


def medians(samples: dict[tuple[str, int], list[Sample]]) -> dict[tuple[str, int], tuple[float, float]]:
    return {c: (statistics.median(s.conns for s in v), statistics.median(s.pps for s in v)) for c, v in samples.items()}


def logging_cost(samples: dict[tuple[str, int], list[Sample]], rule_counts: tuple[int, ...]) -> list[str]:
    """Logging on vs off per layout, rule count and reader (> 0 % = logging costs).

    Rates: the median over rounds of each round's on/off ratio (the two ran seconds apart, so
    background load hits both alike). CPU: the same for CPU per connection / per packet, which
    other processes' load does not enter (only theirs is counted).
    """
    def cost(on: list[Sample], off: list[Sample], attr: str, higher_is_worse: bool) -> float:
        ratios = [getattr(a, attr) / getattr(b, attr) for a, b in zip(on, off, strict=False) if getattr(b, attr)]
        r = statistics.median(ratios) if ratios else 1.0
        return 100 * (r - 1 if higher_is_worse else 1 - r)

    out = [f"{'configuration':<20} {'rules':>6}   {'TCP conn/s':>10} {'UDP pkt/s':>10}   "
           f"{'CPU/conn':>9} {'CPU/pkt':>9}"]
    for layout, off in (("nft-lookup", NOLOG), ("ipt-lookup", "ipt-lookup-nolog")):
        for reader in ("", "/oldreader", "/naive", "/noreader"):
            for rules in rule_counts:
                on = (layout + reader, rules)
                if on in samples and (off, rules) in samples:
                    a, b = samples[on], samples[(off, rules)]
                    out.append(f"{layout + reader:<20} {rules:>6,}   {cost(a, b, 'conns', False):>9.1f}% "
                               f"{cost(a, b, 'pps', False):>9.1f}%   {cost(a, b, 'cpu_conn_us', True):>8.1f}% "
                               f"{cost(a, b, 'cpu_pkt_us', True):>8.1f}%")
    return out


# ---- eBPF program cost -------------------------------------------------------------------------


def program_rows(ns: Namespaces) -> list[str]:
    backend = EbpfBackend(netns=ns.srv)
    backend.remove()
    backend.apply(backend.render(bench_policy(10, 10)))  # cold: loads (verifies) both programs
    rows = []
    for r in backend.last_load():
        pinned = backend.loader.pin_dir / ("prog_in" if r.hook.value == "ingress" else "prog_out")
        tool = ""
        if shutil.which("bpftool"):
            proc = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(pinned)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                info = json.loads(proc.stdout)
                tool = (f"bpftool: xlated {info.get('bytes_xlated')} B, jited {info.get('bytes_jited')} B, "
                        f"verified_insns {info.get('verified_insns', '-')}")
        rows.append(f"{r.hook.value:<8} {r.insns:>6,} insns {r.jited_bytes:>7,} B jited "
                    f"{r.verified_insns:>8,} verified insns  load {r.load_seconds * 1e3:>6.1f} ms   {tool}")
    backend.remove()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rule counts, shorter runs")
    parser.add_argument("--no-iptables", action="store_true", help="leave the iptables configurations out")
    parser.add_argument("--rules", help="comma-separated rule counts (default 10,100,1000,5000)")
    parser.add_argument("--peers", type=int, default=PEERS, help=f"peer addresses in total (default {PEERS})")
    parser.add_argument("--rounds", type=int, help="interleaved traffic rounds (default 3)")
    parser.add_argument("--seconds", type=float, help="seconds per traffic test (default 1.5)")
    parser.add_argument("--logging", action="store_true",
                        help="only the cost of flow logging: lookup layouts with/without logging, by NFLOG reader")
    parser.add_argument("--old-reader", help="with --logging: also read with the NflogReader of this nflog.py file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, nftables, tc, bpf)", file=sys.stderr)
        return 1
    rule_counts: tuple[int, ...] = RULE_COUNTS if not args.quick else (10, 1_000)
    if args.rules:
        rule_counts = tuple(int(x) for x in args.rules.split(","))
    repeats = 2 if args.quick else 3
    seconds, rounds = (0.5, 1) if args.quick else (1.5, 3)
    seconds, rounds = args.seconds or seconds, args.rounds or rounds
    iptables = not args.no_iptables and shutil.which("iptables-legacy-restore") is not None
    print(f"# nftables list/lookup vs eBPF{' vs iptables+ipset' if iptables else ''} (kernel {os.uname().release}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}); {args.peers:,} peers, client in the last set")
    ns = Namespaces.create()
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="stk-bench-ebpf-"))
    try:
        tools = build_tools(workdir)
        backends = make_backends(ns, iptables)
        if not args.logging:
            load_tables(ns, backends, rule_counts, args.peers, repeats, iptables)
        print(f"\n## traffic ({args.peers:,} peers; medians of {rounds} interleaved rounds of {seconds} s)")
        samples = measure_traffic(ns, backends, rule_counts, args.peers, tools, seconds, rounds, args.logging,
                                  os.path.abspath(args.old_reader) if args.old_reader else None)
        rates = medians(samples)
        header = (f"{'backend':<20} {'rules':>6} {'TCP conn/s':>11} {'UDP pkt/s':>11} "
                  f"{'conn % eBPF':>11} {'pkt % eBPF':>10} {'conn % own 10':>13} {'pkt % own 10':>12}")
        print(header)
        print("-" * len(header))
        for (name, rules), (conns, pps) in rates.items():
            line = f"{name:<20} {rules:>6,} {conns:>11,.0f} {pps:>11,.0f}"
            if name != "none":
                ebpf = rates.get(("ebpf", rules), (conns, pps))
                own = rates.get((name, min(rule_counts)), (conns, pps))
                line += (f" {100 * conns / ebpf[0]:>10.0f}% {100 * pps / ebpf[1]:>9.0f}% "
                         f"{100 * conns / own[0]:>12.0f}% {100 * pps / own[1]:>11.0f}%")
            print(line)
        print("\n## cost of flow logging (lookup with logging vs without; > 0 % = logging costs; medians of the "
              "rounds' on/off ratios)")
        print("(no suffix: the agent's NflogReader + FlowBuffer read the group; /oldreader: --old-reader's; /naive: "
              "one recv per message at the kernel's defaults; /noreader: no reader bound)")
        for line in logging_cost(samples, rule_counts):
            print(line)
        print("\n## CPU per connection / per packet (medians; client+server or sender+receiver, reader, ksoftirqd)")
        for (name, rules), v in samples.items():
            print(f"{name:<20} {rules:>6,} {statistics.median(x.cpu_conn_us for x in v):>8.1f} us/conn "
                  f"{statistics.median(x.cpu_pkt_us for x in v):>8.2f} us/pkt")
        print(f"(load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())})")
    finally:
        ns.delete()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s; client {CLI4} -> server {SRV4})")
    return 0


def load_tables(ns: Namespaces, backends: dict[str, Backend], rule_counts: tuple[int, ...], peers: int,
                repeats: int, iptables: bool) -> None:
    """The program table and the load-and-delta table."""
    print("\n## program")
    for row in program_rows(ns):
        print(row)
    print(f"\n## load and delta ({peers:,} peers)")
    header = (f"{'backend':<18} {'rules':>6} {'render ms':>9} {'cold apply ms':>13} {'warm apply ms':>13} "
              f"{'delta ms':>9} {'delta max':>9}")
    print(header)
    print("-" * len(header))
    for rules in rule_counts:
        hp = bench_policy(peers, rules)
        for name, backend in backends.items():
            r = measure_load(name, backend, hp, rules, repeats)
            print(f"{r.backend:<18} {r.rules:>6,} {r.render_ms:>9.1f} {r.cold_ms:>13.1f} {r.warm_ms:>13.1f} "
                  f"{r.delta_ms:>9.3f} {r.delta_max_ms:>9.3f}", flush=True)
        if iptables:
            print(measure_ipset_tier(ns, hp, rules), flush=True)


if __name__ == "__main__":
    sys.exit(main())

