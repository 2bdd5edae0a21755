"""The eBPF backend: the same HostPolicy, enforced by tc programs and LPM-trie maps.

Choices, and why:

* **Attach point: tc clsact (ingress + egress) on every Ethernet interface of the host or
  network namespace**, direct-action, at our own filter preference. A cgroup_skb program
  would see only local sockets' traffic and attaches to a cgroup, which is not scoped to a
  network namespace: on the root cgroup it would filter every namespace on the machine at
  once (the kernel lab, containers), and kernel-generated packets without a socket (RSTs,
  ICMP errors) bypass it. tc sees every packet on the interface, including forwarded
  traffic, which this backend treats as the host's own (like the nftables backend without
  ``forward``); loopback is never attached (the failsafe's "loopback accept"). A pass
  returns ``TC_ACT_UNSPEC``, so another tc filter after ours still runs; tc ingress runs
  before netfilter and egress after it, so nftables/iptables rules keep working alongside.
  Limits: Ethernet framing only (other link types are refused); interfaces created after
  an apply are protected from the next apply on.
* **State: an LRU flow map of our own**, not the kernel's conntrack through the
  ``bpf_skb_ct_lookup`` kfunc (present on this kernel). A namespace tracks nothing until
  some netfilter rule uses conntrack (measured: ``conntrack -L`` stays empty without
  one), so the kfunc would make eBPF enforcement depend on nftables being loaded. Flows
  are keyed by 5-tuple (ICMP echo: identifier), created by an allowed first packet; a
  packet of either orientation passes. A TCP SYN always re-evaluates (a reused 5-tuple
  is a new connection). Every policy change bumps an epoch; a flow of an older epoch is
  re-checked once against the new policy on its next packet, in its original direction
  (kept if still allowed, cut if not): stricter than conntrack, which keeps established
  flows forever. Limits: idle timeouts instead of TCP state tracking (TCP 5 days, UDP
  180 s, ICMP 30 s, other 600 s); under pressure the LRU evicts the least recently used
  flow, whose next reply is then judged as a new connection; ICMP errors pass as
  "related" only when they quote a known flow; later IP fragments follow their first
  fragment's verdict (a later fragment seen first gets the mode's default).
* **Maps**: one LPM trie per policy generation holds both lookups, told apart by a kind
  byte: peer address -> identity (the exact combination of peer sets the address is in),
  and (identity, direction, protocol, port) -> verdict + rule, whose entries are disjoint
  port intervals resolved by precedence (failsafe > override-deny > allow > deny) at render
  time (:mod:`ebpf_identity`). Per packet: two trie lookups, whatever the number of peers
  and rules; a port range costs at most 30 trie entries, not one per port.
* **Atomic updates**: generations A and B are the two slots of a map-in-map array; a new
  policy fills a fresh trie in the idle slot and is switched in by one update of
  ``stk_current`` (:mod:`ebpf_loader`). Set deltas change only the generation in force:
  usually one trie update per address (a new combination of sets first gets its policy
  rows, then the address points at it). A batch of deltas is not one transaction: each
  address sees its old or its new sets.
* **Loader**: our own ``bpf()`` calls through ctypes (:mod:`ebpf_syscall`) and ELF reader
  (:mod:`ebpf_elf`), ``tc`` argv for attachment; pins under ``/sys/fs/bpf/<table>/<netns>``
  (bpffs mounted if absent). The object file is compiled on first use
  (:mod:`stockade.bpf.build`).
* **Encryption** (``encrypt: true``): the shared :class:`~stockade.backends.wireguard.Tunnel`
  (wireguard-go device, peers one at a time over UAPI) with the programs doing the steering:
  an encrypted allow's verdict is ``allow-encrypted``; its connection's packets are redirected
  into the WireGuard interface at egress (``bpf_redirect``: tc egress runs after routing, so
  a mark would not re-route them; the policy routing the Tunnel installs is unused here) and
  accepted at ingress only from it; the interface's index is in ``stk_current`` and the
  interface runs the same programs built for a link without Ethernet header. No tunnel, a
  dead wireguard-go or a deleted interface: the redirect fails or is refused, the traffic is
  dropped, never sent in the clear, until the next apply restores the device.
* **Visibility**: would-be drops pass, are counted (``stats()["would_block"]``) and
  reported as flow events (:mod:`ebpf_events`), like every new-connection verdict.

Set deltas need the policy this backend instance applied (the identity table lives in
memory); another process must apply the full policy first (the agent always does).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from stockade.backends.base import (
    Capability,
    EventFlows,
    VerifyReport,
    check_capabilities,
    check_delta_capabilities,
)
from stockade.backends.ebpf.events import FlowEventReader
from stockade.backends.ebpf.identity import Interval, PeerTable, prefix_of
from stockade.backends.ebpf.loader import (
    BPFFS,
    EVENTS_BYTES,
    LAYOUT,
    SERIAL_KEY,
    TUNNEL_PROGRAMS,
    Attachment,
    Current,
    EbpfLoader,
    TcHook,
    ensure_bpffs,
    load_object,
)
from stockade.backends.ebpf.render import (
    IDENT_TEXT_SIZE,
    EbpfArtifact,
    EbpfTables,
    PeerEntry,
    identity_text,
    peer_key,
    peer_value,
    policy_items,
    render_ebpf,
    text_value,
)
from stockade.backends.ebpf.syscall import BpfMap, open_map, open_pinned
from stockade.backends.ebpf.takeover import seed_flows
from stockade.backends.wireguard import SOCKET_MARK, Tunnel, WireGuardDevice, tunnel_datapath, tunnel_peer_delta
from stockade.bpf.build import object_path
from stockade.compiler.ir import HostPolicy, PeerDelta, SetDelta, WireGuardConfig
from stockade.errors import ApplyError, RenderError
from stockade.model.addresses import Family
from stockade.model.workloads import EnforcementMode

# SCTP: the datapath parses TCP/UDP ports only (SCTP is an "other" protocol, port 0)
EBPF_CAPABILITIES = frozenset(Capability) - {Capability.SCTP}
DEFAULT_PREF = 1000
DEFAULT_FLOW_CAPACITY = 65536
HOST_DIR = "_host"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


@dataclass(frozen=True)
class LoadReport:
    """Cost of the last program load (``bench/ebpf.py``)."""

    hook: TcHook
    insns: int
    verified_insns: int
    jited_bytes: int
    load_seconds: float


class EbpfBackend:
    """eBPF enforcement for one host (or one network namespace)."""

    name = "ebpf"
    capabilities: frozenset[Capability] = EBPF_CAPABILITIES

    def __init__(
        self,
        netns: str | None = None,
        table: str = "stockade",
        *,
        interfaces: tuple[str, ...] | None = None,
        pref: int = DEFAULT_PREF,
        flow_capacity: int = DEFAULT_FLOW_CAPACITY,
        forward: bool = False,
        log_group: int | None = None,
        pin_root: str = BPFFS,
        wireguard: WireGuardDevice | None = None,
    ) -> None:
        if forward:
            raise ApplyError("the ebpf backend filters every packet on the host's interfaces; 'forward' has no meaning")
        if log_group is not None:
            raise ApplyError("the ebpf backend reports flows on its ring buffer, not to an NFLOG group")
        for what, value in (("table", table), ("netns", netns)):
            if value is not None and not _NAME_RE.match(value):
                raise ApplyError(f"invalid {what} name {value!r}")
        if not 1 <= pref <= 0xFFFF:
            raise ApplyError(f"tc preference {pref} out of range")
        self.netns = netns
        self.table = table
        self.root = Path(pin_root) / table
        self.loader = EbpfLoader(
            self.root / (netns or current_netns_dir()), netns, pref=pref, flow_capacity=flow_capacity,
            interfaces=interfaces,
        )
        self._applied: EbpfArtifact | None = None
        self._serial: int | None = None
        self._peers: PeerTable | None = None
        self._gen_maps: dict[str, BpfMap] = {}
        self.wireguard = wireguard  # the tunnel of encrypted rules (None: they fail to render)
        self._tunnel = Tunnel(wireguard) if wireguard is not None else None

    # ---- pure ------------------------------------------------------------------------
    def render(self, host_policy: HostPolicy) -> EbpfArtifact:
        check_capabilities(self.name, self.capabilities, host_policy)
        encrypted = host_policy.wireguard is not None or any(r.encrypt for r in host_policy.rules)
        if encrypted and host_policy.mode is not EnforcementMode.IDLE and self.wireguard is None:
            raise RenderError("encrypted rules need a valid WireGuard interface name, got None")
        return render_ebpf(host_policy)

    # ---- kernel ----------------------------------------------------------------------
    def apply(self, artifact: EbpfArtifact) -> None:
        """Put ``artifact`` in force with one switch (idle: detach and remove everything)."""
        if not artifact.present:
            self.remove()
            return
        ensure_bpffs()
        self._sweep_stale()
        obj, digest = load_object(object_path())
        loader = self.loader
        self._drop_gen_maps()
        loader.open_maps(create=True)
        cur = loader.current()
        pinned = loader.pinned_program_ids()
        reload = cur is None or cur.object != digest or cur.layout != LAYOUT or len(pinned) != len(TcHook)
        wg = artifact.host_policy.wireguard if self._tunnel is not None else None
        reload_tunnel = wg is not None and (reload or len(loader.pinned_program_ids(TUNNEL_PROGRAMS)) != len(TcHook))
        serial = 0 if cur is None else cur.serial + 1
        with ThreadPoolExecutor(max_workers=2) as pool:  # the verifier runs while the trie fills
            loading = [pool.submit(loader.load_programs, obj)] if reload else []
            if reload_tunnel:
                loading.append(pool.submit(loader.load_programs, obj, TUNNEL_PROGRAMS))
            loader.write_generation(serial & 1, serial, artifact)
            for job in loading:
                job.result()
        new = Current(
            serial=serial,
            epoch=1 if cur is None else cur.epoch + 1,
            mode=artifact.mode,
            layout=LAYOUT,
            object=digest,
            wg_ifindex=self._tunnel_index() if wg is not None else 0,
            wg_mark=SOCKET_MARK if wg is not None else 0,
        )
        takeover = cur is None  # a fresh flow map: spare the connections already established
        if takeover:
            seed_flows(loader.maps["stk_flows"], self.netns, artifact.host_policy.local_addresses)
        loader.set_current(new)
        try:
            loader.attach()
            if takeover:  # and those established while it attached
                seed_flows(loader.maps["stk_flows"], self.netns, artifact.host_policy.local_addresses)
        except ApplyError:
            if cur is not None and cur.object == digest:
                loader.set_current(replace(cur, epoch=new.epoch + 1))
            raise
        self._applied, self._serial, self._peers = artifact, new.serial, None
        if self._tunnel is not None:  # after the maps: encrypted traffic is dropped while it comes up
            self._tunnel.apply(wg, artifact.host_policy.local_addresses)
            if wg is not None:
                index = loader.attach_tunnel(self._tunnel.interface)
                if index != new.wg_ifindex:
                    loader.set_current(replace(new, wg_ifindex=index))

    def _tunnel_index(self) -> int:
        """The WireGuard interface's index now (0: absent)."""
        assert self._tunnel is not None
        link = self.loader.tunnel_link(self._tunnel.interface)
        return 0 if link is None else link.index

    def wireguard_datapath(self) -> str:
        """The tunnel's WireGuard implementation ("kernel", "wireguard-go"; "": none up)."""
        return tunnel_datapath(self._tunnel)

    def apply_peer_delta(self, old: WireGuardConfig, delta: PeerDelta) -> None:
        """WireGuard peers set / removed over the control socket; the maps are not touched."""
        tunnel_peer_delta(self._tunnel, old, delta)

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        """Change set members in the generation in force; rules are not touched."""
        check_delta_capabilities(self.name, self.capabilities, deltas)
        if not deltas:
            return
        artifact = self._applied
        cur = self.loader.current()
        if artifact is None or cur is None or cur.serial != self._serial:
            raise ApplyError("no policy applied by this backend instance is in force: apply the full policy first")
        if self._peers is None:
            self._peers = PeerTable(artifact.context, artifact.memberships, artifact.effective, artifact.identity_sets)
        table = self._peers
        known = {s.name for s in artifact.host_policy.sets}
        for d in deltas:
            if d.name not in known:
                raise ApplyError(f"set {d.name} is not in the policy in force")
            direct = table.direct[d.family]
            missing = [m for m in d.removed if d.name not in direct.get(prefix_of(m), frozenset())]
            if missing:
                raise ApplyError(f"set {d.name}: {missing[0]} is not a member; reload the policy")
        trie, idents = self._generation_maps(cur)
        for d in deltas:
            plan = table.plan(d.family, d.name, d.added, d.removed)
            for key, value in policy_items(plan.new_intervals):  # a new combination's rows first
                trie.update(key, value)
            for (start, plen), ident in plan.updates:
                trie.update(peer_key(d.family, start, plen), peer_value(ident))
            for start, plen in plan.deletes:
                trie.delete(peer_key(d.family, start, plen))
            table.commit()
            for ident, sets in plan.new_identities:  # names are for people: best effort
                with contextlib.suppress(ApplyError):
                    idents.update(struct.pack("=I", ident), text_value(identity_text(sets), IDENT_TEXT_SIZE))
        self.loader.set_current(replace(cur, epoch=cur.epoch + 1))

    def _generation_maps(self, cur: Current) -> tuple[BpfMap, BpfMap]:
        if not self._gen_maps:
            trie = self.loader.trie(cur.generation)
            idents = self.loader.names("idents", cur.generation)
            if trie is None or idents is None:
                for m in (trie, idents):
                    if m is not None:
                        m.close()
                raise ApplyError(f"generation {cur.generation} is incomplete; reload the policy")
            self._gen_maps = {"trie": trie, "idents": idents}
        return self._gen_maps["trie"], self._gen_maps["idents"]

    def _drop_gen_maps(self) -> None:
        for m in self._gen_maps.values():
            m.close()
        self._gen_maps = {}

    def read_back(self) -> str:
        cur = self.loader.current()
        if cur is None:
            return ""
        pinned = self.loader.pinned_program_ids()
        lines = [
            f"# Stockade eBPF state{f' in netns {self.netns}' if self.netns else ''}",
            f"current serial {cur.serial} generation {cur.generation} epoch {cur.epoch} "
            f"mode {cur.mode.value} layout {cur.layout}"
            + (f" tunnel ifindex {cur.wg_ifindex} fwmark 0x{cur.wg_mark:x}" if cur.wg_ifindex or cur.wg_mark else ""),
            "attachments (interface hook -> program)",
        ]
        for a in self.loader.attachments():
            mark = "" if pinned.get(a.hook) == a.prog_id else "  NOT the pinned program"
            lines.append(f"  {a.interface} {a.hook.value} {a.prog_name} tag {a.tag}{mark}")
        return "\n".join(lines) + "\n\n" + self.loader.tables(cur).text()

    def verify(self, expected: EbpfArtifact) -> VerifyReport:
        """Compare the kernel with ``expected`` by meaning (identity numbers may differ)."""
        cur = self.loader.current()
        if not expected.present:
            return VerifyReport(() if cur is None else ("eBPF maps are installed but the policy is idle",))
        if cur is None:
            return VerifyReport(("eBPF maps are not installed",))
        problems: list[str] = []
        if cur.mode is not expected.mode:
            problems.append(f"mode is {cur.mode.value}, expected {expected.mode.value}")
        pinned = self.loader.pinned_program_ids()
        attached = {(a.interface, a.hook): a for a in self.loader.attachments()}
        for iface in self.loader.list_interfaces():
            for hook in TcHook:
                a = attached.get((iface.name, hook))
                if a is None:
                    problems.append(f"{iface.name} {hook.value}: no Stockade program attached")
                elif a.prog_id != pinned.get(hook):
                    problems.append(f"{iface.name} {hook.value}: program {a.prog_id} is not the pinned one")
        wg = expected.host_policy.wireguard
        if self._tunnel is not None and (wg is not None or cur.wg_ifindex):
            problems += self._tunnel.problems(wg)
            if wg is not None:
                problems += self.loader.tunnel_problems(self._tunnel.interface, cur)
        if wg is None and cur.wg_ifindex:
            problems.append(f"stk_current names a WireGuard interface ({cur.wg_ifindex}) but no rule encrypts")
        contents = self.loader.trie_contents(cur.generation)
        rules = self.loader.name_texts("rules", cur.generation)
        keys, values = expected.trie_items()
        same_rules = rules == dict(enumerate(expected.rules))
        if not (same_rules and len(contents) == len(keys) and contents == dict(zip(keys, values, strict=True))):
            # identities may be numbered differently (set deltas): compare what each peer gets
            problems += compare_tables(self.loader.tables(cur, contents), expected)
        return VerifyReport(tuple(problems))

    def remove(self) -> None:
        """Detach our filters and unpin every map and program. Idempotent."""
        self._drop_gen_maps()
        self.loader.detach()
        if self._tunnel is not None:
            self._tunnel.remove()
        self.loader.remove_pins()
        self._applied, self._serial, self._peers = None, None, None
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def close(self) -> None:
        self._drop_gen_maps()
        self.loader.close()

    # ---- observability --------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """The datapath's counters (summed over CPUs): pass_flow, allow_new, block, would_block..."""
        return self.loader.stats()

    def flow_events(self) -> FlowEventReader:
        """A reader of the flow-event ring buffer (close it when done); ApplyError before the first apply."""
        ring = open_map(open_pinned(str(self.loader.pin_dir / "stk_events")))
        try:
            counters = open_map(open_pinned(str(self.loader.pin_dir / "stk_stats")))
        except BaseException:
            ring.close()
            raise
        return FlowEventReader(ring, EVENTS_BYTES, self.rule_name, counters)

    def flow_source(self) -> EventFlows:
        """Flows come from the ring buffer (the agent reports them like NFLOG packets)."""
        return EventFlows(self.flow_events)

    def rule_name(self, serial: int, index: int) -> str:
        """The rule id of ``index`` in the policy of ``serial`` (current or previous apply)."""
        m = self.loader.names("rules", serial & 1)
        if m is not None:
            with m:
                marker = m.lookup(struct.pack("=I", SERIAL_KEY))
                raw = m.lookup(struct.pack("=I", index))
            if marker is not None and raw is not None and _text(marker) == str(serial):
                return _text(raw)
        return f"rule#{index}@{serial}"

    def attachments(self) -> list[Attachment]:
        return self.loader.attachments()

    def last_load(self) -> list[LoadReport]:
        return [
            LoadReport(hook, info.insn_count, info.verified_insns, info.jited_len, seconds)
            for hook, (info, seconds) in sorted(self.loader.last_load.items(), key=lambda kv: kv[0].value)
        ]

    def _sweep_stale(self) -> None:
        """Remove pins left for network namespaces that no longer exist."""
        if not self.root.is_dir():
            return
        live: set[int] | None = None
        for entry in self.root.iterdir():
            if entry == self.loader.pin_dir or entry.name == HOST_DIR:
                continue
            if entry.name.startswith(_ANON_PREFIX):
                live = _live_netns_inodes() if live is None else live
                if entry.name[len(_ANON_PREFIX) :].isdigit() and int(entry.name[len(_ANON_PREFIX) :]) not in live:
                    shutil.rmtree(entry, ignore_errors=True)
            elif _NAME_RE.match(entry.name) and not os.path.exists(f"/run/netns/{entry.name}"):
                shutil.rmtree(entry, ignore_errors=True)


_Row = tuple[str, int, int, int, int, str]
_Rows = tuple[_Row, ...]


_ANON_PREFIX = "_ns"
_INIT_NET_INODE = 0xEFFFFFF9  # PROC_NET_INIT_INO (include/linux/proc_ns.h): fixed for the initial namespace


def current_netns_dir() -> str:
    """The pin directory of the calling thread's network namespace when none is named:
    ``_host`` in the initial namespace, ``_ns<inode>`` in any other (an agent started with
    ``--netns``), so agents in different namespaces never share maps."""
    mine = os.stat("/proc/thread-self/ns/net").st_ino
    return HOST_DIR if mine == _INIT_NET_INODE else f"{_ANON_PREFIX}{mine}"


def _live_netns_inodes() -> set[int]:
    """Inodes of every network namespace still alive (named, or held by a process)."""
    found: set[int] = set()
    for path in [*Path("/run/netns").glob("*"), *Path("/proc").glob("[0-9]*/ns/net")]:
        with contextlib.suppress(OSError):
            found.add(os.stat(path).st_ino)
    return found


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _semantic(tables: EbpfTables) -> tuple[dict[tuple[Family, int, int], _Rows], _Rows]:
    """prefix -> the policy rows its identity gets (rule names, not indexes); and no-set rows."""
    by_ident: dict[int, list[_Row]] = {}
    for r in tables.policy:
        name = tables.rules[r.rule] if r.rule < len(tables.rules) else f"#{r.rule}"
        row = (r.direction.value, r.proto.value, r.first, r.last, r.verdict.value, name)
        by_ident.setdefault(r.identity, []).append(row)
    frozen = {i: tuple(sorted(rows)) for i, rows in by_ident.items()}
    peers = {(p.family, p.start, p.prefixlen): frozen.get(p.identity, ()) for p in tables.peers}
    return peers, frozen.get(0, ())


def compare_tables(kernel: EbpfTables, expected: EbpfArtifact, limit: int = 10) -> list[str]:
    have, have_none = _semantic(kernel)
    want, want_none = _semantic(expected.tables)
    problems: list[str] = []
    if have_none != want_none:
        problems.append("policy for peers in no set differs")

    def show(k: tuple[Family, int, int]) -> str:
        return PeerEntry(k[0], k[1], k[2], 0).network_text

    for k in sorted(set(want) - set(have), key=lambda k: (k[0].value, k[1], k[2]))[:limit]:
        problems.append(f"peer {show(k)} is missing")
    for k in sorted(set(have) - set(want), key=lambda k: (k[0].value, k[1], k[2]))[:limit]:
        problems.append(f"unexpected peer {show(k)}")
    differ = [k for k in want if k in have and have[k] != want[k]]
    for k in sorted(differ, key=lambda k: (k[0].value, k[1], k[2]))[:limit]:
        problems.append(f"peer {show(k)}: policy differs")
    return problems


__all__ = ["EBPF_CAPABILITIES", "EbpfBackend", "Interval", "LoadReport", "compare_tables"]
