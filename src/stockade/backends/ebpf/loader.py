"""Loading Stockade's datapath for one host or network namespace: maps, programs, pins, tc.

Everything lives under one bpffs directory (``/sys/fs/bpf/<table>/<netns or _host>``):

* maps the programs use, created once and kept across applies and agent restarts:
  ``stk_current`` (the switch), ``stk_gen`` (an array of two generation tries),
  ``stk_flows``, ``stk_frags``, ``stk_events``, ``stk_stats``;
* per generation slot, the rule and identity names (``stk_rules_0``/``_1``,
  ``stk_idents_0``/``_1``), read by user space only (read-back, flow events);
* the two programs ``prog_in`` / ``prog_out``, loaded from the object file built by
  :mod:`stockade.bpf.build`, reloaded only when the object changes; with encrypted rules
  also ``prog_in_l3`` / ``prog_out_l3``, the same code for the WireGuard interface (a tun
  device: no Ethernet header), attached to it alone (:meth:`EbpfLoader.attach_tunnel`).

A policy apply creates a *fresh* generation trie, fills it (one batched update), puts it
in the idle slot of ``stk_gen`` and then updates ``stk_current`` once: the programs read
the generation from it at the start of each packet, so a packet sees the old trie or the
new one, never a mix. (A hash map update swaps in a whole new element under RCU, unlike
an array update which copies over the value in place, so the switch itself is atomic.)
Peers and policy share one trie because every map-in-map update from user space waits
for an RCU grace period (~10-15 ms measured): one slot update per apply, not three.

Attachment is tc ``clsact`` with a ``bpf direct-action`` filter at preference ``pref``,
handle 1, on ingress and egress of every Ethernet interface. Links and filters are read
over rtnetlink from inside the namespace (:mod:`ebpf_netlink`); only changes run ``tc``,
through ``nsenter --net=/run/netns/NAME`` (which keeps /sys/fs/bpf visible, unlike
``ip netns exec``). Only our own filters are ever replaced or deleted; the ``clsact``
qdisc is left in place for others' filters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import struct
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from stockade.backends.common import CommandResult, nsenter_argv, run_command
from stockade.backends.ebpf import netlink as rtnl
from stockade.backends.ebpf import syscall as bpf
from stockade.backends.ebpf.elf import BpfObject, read_object
from stockade.backends.ebpf.identity import Interval
from stockade.backends.ebpf.render import (
    IDENT_TEXT_SIZE,
    KERNEL_MODE,
    KEY_SIZE,
    MODE_OF_KERNEL,
    RULE_TEXT_SIZE,
    VALUE_SIZE,
    EbpfArtifact,
    EbpfTables,
    PeerEntry,
    decode_entry,
    merge_intervals,
    peer_order,
    text_value,
)
from stockade.errors import ApplyError
from stockade.model.workloads import EnforcementMode

LAYOUT = 3  # bump when a map's key/value layout changes: pinned maps are then recreated
BPFFS = "/sys/fs/bpf"
TRIE_CAPACITY = 1 << 24  # LPM tries allocate per entry; this is only a bound
FRAG_CAPACITY = 4096
EVENTS_BYTES = 1 << 18
TC_TIMEOUT_S = 60.0
SERIAL_KEY = 0xFFFFFFFF  # in the name maps: which policy serial they belong to
STAT_NAMES = (
    "pass_flow", "allow_new", "block", "would_block", "pass_nd", "pass_related", "revalidated",
    "revoked", "frag_pass", "frag_drop", "not_ip", "malformed", "events_lost", "otherhost",
    "tunneled", "plain_drop",
)  # fmt: skip  (enum stat in stockade.bpf.c)
_CURRENT = struct.Struct("=IIIIQII")
_M, _T = bpf.MapSpec, bpf.MapType
GEN_TRIE = _M("stk_gen_trie", _T.LPM_TRIE, KEY_SIZE, VALUE_SIZE, TRIE_CAPACITY, bpf.F_NO_PREALLOC)


class TcHook(Enum):
    INGRESS = "ingress"
    EGRESS = "egress"

    def __lt__(self, other: TcHook) -> bool:
        return self.value > other.value  # ingress first

    @property
    def parent(self) -> int:
        return rtnl.PARENT_INGRESS if self is TcHook.INGRESS else rtnl.PARENT_EGRESS


PROGRAMS: tuple[tuple[TcHook, str, str], ...] = (
    (TcHook.INGRESS, "stockade/ingress", "prog_in"),
    (TcHook.EGRESS, "stockade/egress", "prog_out"),
)
TUNNEL_PROGRAMS: tuple[tuple[TcHook, str, str], ...] = (  # for the WireGuard (tun) interface
    (TcHook.INGRESS, "stockade/ingress_l3", "prog_in_l3"),
    (TcHook.EGRESS, "stockade/egress_l3", "prog_out_l3"),
)


def persistent_specs(flow_capacity: int) -> dict[str, bpf.MapSpec]:
    return {
        "stk_current": _M("stk_current", _T.HASH, 4, _CURRENT.size, 1),
        "stk_gen": _M("stk_gen", _T.ARRAY_OF_MAPS, 4, 4, 2),
        "stk_flows": _M("stk_flows", _T.LRU_HASH, 40, 24, flow_capacity),
        "stk_frags": _M("stk_frags", _T.LRU_HASH, 40, 16, FRAG_CAPACITY),
        "stk_events": _M("stk_events", _T.RINGBUF, 0, 0, EVENTS_BYTES),
        "stk_stats": _M("stk_stats", _T.PERCPU_ARRAY, 4, 8, len(STAT_NAMES)),
    }


def name_spec(kind: str, entries: int) -> bpf.MapSpec:
    size = RULE_TEXT_SIZE if kind == "rules" else IDENT_TEXT_SIZE
    return _M(f"stk_{kind}", _T.HASH, 4, size, max(entries, 1), bpf.F_NO_PREALLOC)


@dataclass(frozen=True)
class Current:
    """The single entry of ``stk_current``."""

    serial: int  # full applies so far; the generation in force is serial & 1
    epoch: int  # every change (apply or delta): flows recorded under another epoch re-check
    mode: EnforcementMode
    layout: int
    object: int  # first 8 bytes of the object file's SHA-256
    wg_ifindex: int = 0  # the WireGuard interface: encrypted traffic only through it (0: none)
    wg_mark: int = 0  # wireguard-go's fwmark: its own packets pass egress (0: none)

    @property
    def generation(self) -> int:
        return self.serial & 1

    def pack(self) -> bytes:
        return _CURRENT.pack(self.serial, self.epoch, KERNEL_MODE[self.mode], self.layout, self.object,
                             self.wg_ifindex, self.wg_mark)

    @staticmethod
    def unpack(raw: bytes) -> Current:
        if len(raw) < _CURRENT.size:  # an older layout: no tunnel fields
            raw = raw.ljust(_CURRENT.size, b"\0")
        serial, epoch, mode, layout, obj, wg_ifindex, wg_mark = _CURRENT.unpack(raw[: _CURRENT.size])
        return Current(serial, epoch, MODE_OF_KERNEL.get(mode, EnforcementMode.FULL), layout, obj, wg_ifindex,
                       wg_mark)


@dataclass(frozen=True, order=True)
class Attachment:
    """One tc filter of ours (pref/handle) and the program it runs."""

    interface: str
    hook: TcHook
    prog_id: int
    prog_name: str
    tag: str


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf if it is not mounted yet."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == BPFFS and parts[2] == "bpf":
                return
    os.makedirs(BPFFS, exist_ok=True)
    proc = run_command(["mount", "-t", "bpf", "bpf", BPFFS], TC_TIMEOUT_S)
    if proc.returncode != 0:
        raise ApplyError(f"mounting bpffs on {BPFFS} failed: {proc.stderr.strip()}")


_OBJECTS: dict[tuple[str, int], tuple[BpfObject, int]] = {}


def load_object(path: Path) -> tuple[BpfObject, int]:
    """The parsed object and its digest (parsed once per file version and process)."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _OBJECTS:
        data = path.read_bytes()
        _OBJECTS[key] = (read_object(data), int.from_bytes(hashlib.sha256(data).digest()[:8], "little"))
    return _OBJECTS[key]


class EbpfLoader:
    """The kernel side of the eBPF backend for one namespace (holds open map fds)."""

    def __init__(
        self,
        pin_dir: Path,
        netns: str | None,
        *,
        pref: int,
        flow_capacity: int,
        interfaces: tuple[str, ...] | None,
    ) -> None:
        self.pin_dir = pin_dir
        self.netns = netns
        self.pref = pref
        self.flow_capacity = flow_capacity
        self.interfaces = interfaces
        self.maps: dict[str, bpf.BpfMap] = {}
        self.last_load: dict[TcHook, tuple[bpf.ProgInfo, float]] = {}

    # ---- commands ---------------------------------------------------------------------
    def namespace_exists(self) -> bool:
        return self.netns is None or os.path.exists(f"/run/netns/{self.netns}")

    def _tc(
        self, args: Sequence[str], *, check: bool = True, stdin: str | None = None
    ) -> CommandResult:
        """``tc`` in the namespace. Interface names and pin paths come from the kernel and
        our validated directory, and argv is a list: no shell ever parses them."""
        if self.netns is not None and not self.namespace_exists():
            raise ApplyError(f"network namespace {self.netns!r} does not exist")
        proc = run_command(nsenter_argv(self.netns, ["tc", *args]), TC_TIMEOUT_S, stdin)
        if check and proc.returncode != 0:
            raise ApplyError(f"tc {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
        return proc

    def list_interfaces(self) -> list[rtnl.Link]:
        """The interfaces to protect: every Ethernet one, or those named in ``interfaces``."""
        found = rtnl.links(self.netns)
        if self.interfaces is not None:
            by_name = {link.name: link for link in found}
            missing = [n for n in self.interfaces if n not in by_name]
            if missing:
                raise ApplyError(f"interfaces not found: {', '.join(missing)}")
            return [by_name[n] for n in self.interfaces]
        return [link for link in found if link.hw_type == rtnl.ARPHRD_ETHER]

    # ---- maps -------------------------------------------------------------------------
    def _pin(self, name: str) -> str:
        return str(self.pin_dir / name)

    def open_maps(self, *, create: bool) -> dict[str, bpf.BpfMap] | None:
        """Open the pinned maps (creating them when ``create``); None when absent."""
        if self.maps:
            return self.maps
        specs = persistent_specs(self.flow_capacity)
        opened: dict[str, bpf.BpfMap] = {}
        complete = True
        try:
            for name, spec in specs.items():
                try:
                    m = bpf.open_map(bpf.open_pinned(self._pin(name)))
                except bpf.BpfError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    complete = False
                    break
                opened[name] = m
                if (m.key_size, m.value_size, m.type) != (spec.key_size, spec.value_size, spec.type):
                    complete = False
                    break
        except BaseException:
            for m in opened.values():
                m.close()
            raise
        if complete:
            self.maps = opened
            return opened
        for m in opened.values():
            m.close()
        if not create:
            return None
        self.remove_pins()  # an older layout, or a half-made install: start over
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        created: dict[str, bpf.BpfMap] = {}
        try:
            for name, spec in specs.items():
                inner = bpf.create_map(GEN_TRIE) if name == "stk_gen" else None
                try:
                    created[name] = bpf.create_map(spec, inner)
                finally:
                    if inner is not None:
                        inner.close()
                bpf.pin(created[name].fd, self._pin(name))
        except BaseException:
            for m in created.values():
                m.close()
            self.remove_pins()
            raise
        self.maps = created
        return created

    def current(self) -> Current | None:
        maps = self.open_maps(create=False)
        if maps is None:
            return None
        raw = maps["stk_current"].lookup(struct.pack("=I", 0))
        return None if raw is None else Current.unpack(raw)

    def set_current(self, cur: Current) -> None:
        self.maps["stk_current"].update(struct.pack("=I", 0), cur.pack())

    def trie_contents(self, generation: int) -> dict[bytes, bytes]:
        """The raw entries of slot ``generation``'s trie."""
        trie = self.trie(generation)
        if trie is None:
            return {}
        with trie:
            return dict(trie.items())

    def name_texts(self, kind: str, generation: int) -> dict[int, str]:
        """Index -> text of a slot's rule or identity names (the serial marker left out)."""
        out: dict[int, str] = {}
        m = self.names(kind, generation)
        if m is None:
            return out
        with m:
            for key, value in m.items():
                (index,) = struct.unpack("=I", key)
                if index != SERIAL_KEY:
                    out[index] = value.split(b"\0", 1)[0].decode(errors="replace")
        return out

    def trie(self, generation: int) -> bpf.BpfMap | None:
        """The generation trie in slot ``generation`` (close it when done)."""
        map_id = self.maps["stk_gen"].inner_id(generation)
        return None if map_id is None else bpf.open_map(bpf.map_fd_by_id(map_id))

    def names(self, kind: str, generation: int) -> bpf.BpfMap | None:
        """The rule ("rules") or identity ("idents") names of a slot (close it when done)."""
        try:
            return bpf.open_map(bpf.open_pinned(self._pin(f"stk_{kind}_{generation}")))
        except bpf.BpfError:
            return None

    def write_generation(self, generation: int, serial: int, artifact: EbpfArtifact) -> None:
        """A fresh trie with the artifact's peers and policy, placed in slot ``generation``.

        The names go first (their own pinned maps, swapped by re-pinning), then the trie;
        nothing here is visible to the datapath until ``stk_current`` names the slot.
        """
        idents = artifact.identity_sets
        contents = {
            "rules": (
                [*range(len(artifact.rules)), SERIAL_KEY],
                [*(text_value(r, RULE_TEXT_SIZE) for r in artifact.rules), text_value(str(serial), RULE_TEXT_SIZE)],
                len(artifact.rules) + 1,
            ),
            "idents": (
                [*range(len(idents)), SERIAL_KEY],
                [*(text_value(" ".join(sorted(c)) or "-", IDENT_TEXT_SIZE) for c in idents),
                 text_value(str(serial), IDENT_TEXT_SIZE)],
                max(1024, 4 * len(idents)),  # room for identities new set deltas need
            ),
        }
        for kind, (keys, values, capacity) in contents.items():
            with bpf.create_map(name_spec(kind, capacity)) as m:
                m.update_batch([struct.pack("=I", k) for k in keys], values)
                path = self._pin(f"stk_{kind}_{generation}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                bpf.pin(m.fd, path)
        keys, values = artifact.trie_items()
        with bpf.create_map(GEN_TRIE) as trie:
            if keys:
                trie.update_batch(keys, values)
            self.maps["stk_gen"].set_inner(generation, trie.fd)

    # ---- programs -----------------------------------------------------------------------
    def pinned_program_ids(self, programs: tuple[tuple[TcHook, str, str], ...] = PROGRAMS) -> dict[TcHook, int]:
        out: dict[TcHook, int] = {}
        for hook, _, pin_name in programs:
            try:
                fd = bpf.open_pinned(self._pin(pin_name))
            except bpf.BpfError:
                continue
            try:
                out[hook] = bpf.prog_info(fd).id
            finally:
                bpf.close_fd(fd)
        return out

    def load_programs(self, obj: BpfObject, programs: tuple[tuple[TcHook, str, str], ...] = PROGRAMS) -> None:
        """Load (verify) the programs, in parallel, and pin them in place of the old ones."""
        fds = {name: m.fd for name, m in self.maps.items()}

        def load(section: str) -> tuple[int, float]:
            prog = obj.program(section)
            started = time.perf_counter()
            fd, _ = bpf.load_program(bpf.ProgType.SCHED_CLS, prog.with_maps(fds), obj.license, prog.name)
            return fd, time.perf_counter() - started

        with ThreadPoolExecutor(max_workers=len(programs)) as pool:  # the syscall releases the GIL
            futures = [pool.submit(load, section) for _, section, _ in programs]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:
            for f in futures:
                if f.exception() is None:
                    bpf.close_fd(f.result()[0])
            raise failed[0]  # type: ignore[misc]
        loaded = [f.result() for f in futures]
        for (hook, _, pin_name), (fd, elapsed) in zip(programs, loaded, strict=True):
            try:
                if programs is PROGRAMS:
                    self.last_load[hook] = (bpf.prog_info(fd), elapsed)
                path = self._pin(pin_name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                bpf.pin(fd, path)
            finally:
                bpf.close_fd(fd)

    # ---- tc ----------------------------------------------------------------------------------
    def attachments(self, links: list[rtnl.Link] | None = None) -> list[Attachment]:
        if not self.namespace_exists():
            return []
        links = self.list_interfaces() if links is None else links
        names = {link.index: link.name for link in links}
        hooks = tuple((link.index, hook.parent) for link in links for hook in TcHook)
        found: list[Attachment] = []
        for f in rtnl.filters(self.netns, hooks):
            if f.pref != self.pref or f.kind != "bpf" or f.handle != 1:
                continue
            hook = TcHook.INGRESS if f.parent == rtnl.PARENT_INGRESS else TcHook.EGRESS
            name = names.get(f.ifindex, str(f.ifindex))
            found.append(Attachment(name, hook, f.prog_id, _prog_name(f.prog_id), f.tag))
        return sorted(found)

    def attach(self) -> list[str]:
        """Our filter on every interface (replacing only ours); returns the interfaces."""
        want = self.pinned_program_ids()
        links = self.list_interfaces()
        for link in links:
            if link.hw_type != rtnl.ARPHRD_ETHER:
                raise ApplyError(f"interface {link.name}: link type {link.link_type!r} is not Ethernet")
        have = {(a.interface, a.hook): a.prog_id for a in self.attachments(links)}
        with_clsact = rtnl.clsact_interfaces(self.netns)
        commands: list[str] = []  # one ``tc -batch`` for every change
        for link in links:
            missing = [(h, p) for h, _, p in PROGRAMS if have.get((link.name, h)) != want.get(h)]
            if missing and link.index not in with_clsact:
                commands.append(f"qdisc add dev {link.name} clsact")
            for hook, pin_name in missing:
                commands.append(
                    f"filter replace dev {link.name} {hook.value} pref {self.pref} handle 1 "
                    f"bpf direct-action object-pinned {self._pin(pin_name)}"
                )
        if commands:
            self._tc(["-batch", "-"], stdin="\n".join(commands) + "\n")
        return [link.name for link in links]

    def tunnel_link(self, name: str) -> rtnl.Link | None:
        return next((link for link in rtnl.links(self.netns) if link.name == name), None)

    def attach_tunnel(self, name: str) -> int:
        """The tunnel programs on the WireGuard interface ``name`` (replacing only ours); its index."""
        link = self.tunnel_link(name)
        if link is None:
            raise ApplyError(f"WireGuard interface {name} not found")
        want = self.pinned_program_ids(TUNNEL_PROGRAMS)
        have = {a.hook: a.prog_id for a in self.attachments([link])}
        missing = [(h, p) for h, _, p in TUNNEL_PROGRAMS if have.get(h) != want.get(h)]
        commands = [f"qdisc add dev {link.name} clsact"] if missing and link.index not in rtnl.clsact_interfaces(
            self.netns) else []
        commands += [f"filter replace dev {link.name} {hook.value} pref {self.pref} handle 1 "
                     f"bpf direct-action object-pinned {self._pin(pin_name)}" for hook, pin_name in missing]
        if commands:
            self._tc(["-batch", "-"], stdin="\n".join(commands) + "\n")
        return link.index

    def tunnel_problems(self, name: str, cur: Current) -> list[str]:
        """The WireGuard interface runs our tunnel programs and ``stk_current`` names it."""
        link = self.tunnel_link(name)
        if link is None:
            return []  # the tunnel reports a missing interface itself
        out: list[str] = []
        if cur.wg_ifindex != link.index:
            out.append(f"stk_current names interface index {cur.wg_ifindex}, {name} is {link.index}")
        want = self.pinned_program_ids(TUNNEL_PROGRAMS)
        have = {a.hook: a.prog_id for a in self.attachments([link])}
        for hook in TcHook:
            if have.get(hook) is None:
                out.append(f"{name} {hook.value}: no Stockade program attached")
            elif have.get(hook) != want.get(hook):
                out.append(f"{name} {hook.value}: program {have.get(hook)} is not the pinned one")
        return out

    def detach(self) -> None:
        for a in self.attachments():
            self._tc(["filter", "del", "dev", a.interface, a.hook.value, "pref", str(self.pref), "handle", "1",
                      "bpf"], check=False)

    # ---- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps = {}

    def remove_pins(self) -> None:
        self.close()
        if os.path.isdir(self.pin_dir):
            shutil.rmtree(self.pin_dir, ignore_errors=True)

    # ---- reading back --------------------------------------------------------------------
    def tables(self, cur: Current, contents: dict[bytes, bytes] | None = None) -> EbpfTables:
        """The generation in force as readable tables."""
        gen = cur.generation
        peers: list[PeerEntry] = []
        policy: list[Interval] = []
        raw = self.trie_contents(gen) if contents is None else contents
        for key, value in raw.items():
            entry = decode_entry(key, value)
            if isinstance(entry, PeerEntry):
                peers.append(entry)
            else:
                policy.append(entry)
        rules = self.name_texts("rules", gen)
        rule_list = tuple(rules.get(i, "?") for i in range(max(rules, default=-1) + 1))
        idents = tuple(sorted(self.name_texts("idents", gen).items()))
        return EbpfTables(cur.mode, rule_list, idents, tuple(sorted(peers, key=peer_order)), merge_intervals(policy))

    def stats(self) -> dict[str, int]:
        maps = self.open_maps(create=False)
        if maps is None:
            return {}
        out: dict[str, int] = {}
        cpus = bpf.possible_cpus()
        for i, name in enumerate(STAT_NAMES):
            raw = maps["stk_stats"].lookup(struct.pack("=I", i)) or b""
            out[name] = sum(struct.unpack_from("=Q", raw, 8 * c)[0] for c in range(min(cpus, len(raw) // 8)))
        return out


def _prog_name(prog_id: int) -> str:
    try:
        fd = bpf.prog_fd_by_id(prog_id)
    except bpf.BpfError:
        return "?"
    try:
        return bpf.prog_info(fd).name
    finally:
        bpf.close_fd(fd)
