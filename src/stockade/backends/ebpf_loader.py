"""Loading Stockade's datapath for one host or network namespace: maps, programs, pins, tc.

Everything lives under one bpffs directory (``/sys/fs/bpf/<table>/<netns or _host>``):

* persistent maps, created once and kept across policy applies and agent restarts:
  ``stk_current`` (the switch), ``stk_flows``, ``stk_frags``, ``stk_events``, ``stk_stats``
  and the generation arrays ``stk_peers4``/``stk_peers6``/``stk_policy`` (read by the
  programs) plus ``stk_rules``/``stk_idents`` (rule and identity names, for read-back and
  flow events);
* the two programs ``prog_in`` / ``prog_out``, loaded from the object file built by
  :mod:`stockade.bpf.build`, reloaded only when the object changes.

A policy apply creates *fresh* inner maps, fills them (batched), puts them in the idle
slot of each generation array, then updates ``stk_current`` once: the programs read the
generation from it at the start of each packet, so a packet sees the old maps or the new
ones, never a mix. (A hash map update swaps in a whole new element under RCU, unlike an
array update which copies over the value in place, so the switch itself is atomic.) Old
inner maps are freed by the kernel once no program run can still hold them.

Attachment is tc ``clsact`` with a ``bpf direct-action`` filter at preference ``pref``,
handle 1, on ingress and egress of every Ethernet interface (``tc`` run through
``nsenter --net=/run/netns/NAME``, which keeps /sys/fs/bpf visible, unlike
``ip netns exec``). Only our own filters are ever replaced or deleted; the ``clsact``
qdisc is left in place for others' filters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from stockade.backends import ebpf_syscall as bpf
from stockade.backends.ebpf_elf import BpfObject, read_object
from stockade.backends.ebpf_identity import Interval, Verdict
from stockade.backends.ebpf_render import (
    IDENT_TEXT_SIZE,
    KERNEL_MODE,
    MODE_OF_KERNEL,
    RULE_TEXT_SIZE,
    EbpfArtifact,
    EbpfTables,
    PeerEntry,
    decode_peer_key,
    decode_policy_key,
    merge_intervals,
    peer_key,
    peer_value,
    policy_items,
    text_value,
)
from stockade.errors import ApplyError
from stockade.model.addresses import Family
from stockade.model.workloads import EnforcementMode

LAYOUT = 1  # bump when a map's key/value layout changes: pinned maps are then recreated
BPFFS = "/sys/fs/bpf"
TRIE_CAPACITY = 1 << 24  # LPM tries allocate per entry; this is only a bound
NAME_CAPACITY = 1 << 20
FRAG_CAPACITY = 4096
EVENTS_BYTES = 1 << 18
STAT_NAMES = (
    "pass_flow", "allow_new", "block", "would_block", "pass_nd", "pass_related", "revalidated",
    "revoked", "frag_pass", "frag_drop", "not_ip", "malformed", "events_lost", "otherhost",
)  # fmt: skip  (enum stat in stockade.bpf.c)
_CURRENT = struct.Struct("=IIIIQ")


class TcHook(Enum):
    INGRESS = "ingress"
    EGRESS = "egress"

    def __lt__(self, other: TcHook) -> bool:
        return self.value > other.value  # ingress first


PROGRAMS: tuple[tuple[TcHook, str, str], ...] = (
    (TcHook.INGRESS, "stockade/ingress", "prog_in"),
    (TcHook.EGRESS, "stockade/egress", "prog_out"),
)

_M, _T = bpf.MapSpec, bpf.MapType
INNER: dict[str, bpf.MapSpec] = {
    "stk_peers4": _M("stk_peers4_g", _T.LPM_TRIE, 8, 4, TRIE_CAPACITY, bpf.F_NO_PREALLOC),
    "stk_peers6": _M("stk_peers6_g", _T.LPM_TRIE, 20, 4, TRIE_CAPACITY, bpf.F_NO_PREALLOC),
    "stk_policy": _M("stk_policy_g", _T.LPM_TRIE, 12, 8, TRIE_CAPACITY, bpf.F_NO_PREALLOC),
    "stk_rules": _M("stk_rules_g", _T.HASH, 4, RULE_TEXT_SIZE, NAME_CAPACITY, bpf.F_NO_PREALLOC),
    "stk_idents": _M("stk_idents_g", _T.HASH, 4, IDENT_TEXT_SIZE, NAME_CAPACITY, bpf.F_NO_PREALLOC),
}


def persistent_specs(flow_capacity: int) -> dict[str, bpf.MapSpec]:
    specs = {
        "stk_current": _M("stk_current", _T.HASH, 4, _CURRENT.size, 1),
        "stk_flows": _M("stk_flows", _T.LRU_HASH, 40, 24, flow_capacity),
        "stk_frags": _M("stk_frags", _T.LRU_HASH, 40, 16, FRAG_CAPACITY),
        "stk_events": _M("stk_events", _T.RINGBUF, 0, 0, EVENTS_BYTES),
        "stk_stats": _M("stk_stats", _T.PERCPU_ARRAY, 4, 8, len(STAT_NAMES)),
    }
    for name in INNER:
        specs[name] = _M(name, _T.ARRAY_OF_MAPS, 4, 4, 2)
    return specs


@dataclass(frozen=True)
class Current:
    """The single entry of ``stk_current``."""

    serial: int  # full applies so far; the generation in force is serial & 1
    epoch: int  # every change (apply or delta): flows recorded under another epoch re-check
    mode: EnforcementMode
    layout: int
    object: int  # first 8 bytes of the object file's SHA-256

    @property
    def generation(self) -> int:
        return self.serial & 1

    def pack(self) -> bytes:
        return _CURRENT.pack(self.serial, self.epoch, KERNEL_MODE[self.mode], self.layout, self.object)

    @staticmethod
    def unpack(raw: bytes) -> Current:
        serial, epoch, mode, layout, obj = _CURRENT.unpack(raw[: _CURRENT.size])
        return Current(serial, epoch, MODE_OF_KERNEL.get(mode, EnforcementMode.FULL), layout, obj)


@dataclass(frozen=True, order=True)
class Attachment:
    """One tc filter of ours (pref/handle) and the program it runs."""

    interface: str
    hook: TcHook
    prog_id: int
    prog_name: str
    tag: str


@dataclass(frozen=True)
class Interface:
    name: str
    link_type: str


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf if it is not mounted yet."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[1] == BPFFS and parts[2] == "bpf":
                return
    os.makedirs(BPFFS, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ApplyError(f"mounting bpffs on {BPFFS} failed: {proc.stderr.strip()}")


def object_digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


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
    def _argv(self, argv: Sequence[str]) -> list[str]:
        if self.netns is None:
            return list(argv)
        path = f"/run/netns/{self.netns}"
        if not os.path.exists(path):
            raise ApplyError(f"network namespace {self.netns!r} does not exist")
        return ["nsenter", f"--net={path}", *argv]

    def _run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self._argv(argv), capture_output=True, text=True, check=False, timeout=60)
        if check and proc.returncode != 0:
            raise ApplyError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
        return proc

    def list_interfaces(self) -> list[Interface]:
        links = json.loads(self._run(["ip", "-j", "link", "show"]).stdout or "[]")
        found = [Interface(str(link["ifname"]), str(link.get("link_type", ""))) for link in links]
        if self.interfaces is not None:
            by_name = {i.name: i for i in found}
            missing = [n for n in self.interfaces if n not in by_name]
            if missing:
                raise ApplyError(f"interfaces not found: {', '.join(missing)}")
            return [by_name[n] for n in self.interfaces]
        return [i for i in found if i.link_type == "ether"]

    # ---- maps -------------------------------------------------------------------------
    def _pin(self, name: str) -> str:
        return str(self.pin_dir / name)

    def installed(self) -> bool:
        return os.path.exists(self._pin("stk_current"))

    def open_maps(self, *, create: bool) -> dict[str, bpf.BpfMap] | None:
        """Open the pinned maps (creating them when ``create``); None when absent."""
        if self.maps:
            return self.maps
        specs = persistent_specs(self.flow_capacity)
        opened: dict[str, bpf.BpfMap] = {}
        stale = False
        try:
            for name, spec in specs.items():
                try:
                    m = bpf.open_map(bpf.open_pinned(self._pin(name)))
                except bpf.BpfError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    stale = stale or bool(opened)
                    break
                if (m.key_size, m.value_size, m.type) != (spec.key_size, spec.value_size, spec.type):
                    m.close()
                    stale = True
                    break
                opened[name] = m
            else:
                self.maps = opened
                return opened
        except BaseException:
            for m in opened.values():
                m.close()
            raise
        for m in opened.values():
            m.close()
        if not create:
            return None
        if stale or os.path.isdir(self.pin_dir):
            self.remove_pins()  # an older layout, or a half-made install: start over
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        created: dict[str, bpf.BpfMap] = {}
        try:
            for name, spec in specs.items():
                inner = bpf.create_map(INNER[name]) if name in INNER else None
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

    def inner(self, outer: str, generation: int) -> bpf.BpfMap | None:
        map_id = self.maps[outer].inner_id(generation)
        return None if map_id is None else bpf.open_map(bpf.map_fd_by_id(map_id))

    def write_generation(self, generation: int, artifact: EbpfArtifact) -> None:
        """Fresh inner maps with the artifact's contents, placed in slot ``generation``."""
        peers = {Family.V4: ([], []), Family.V6: ([], [])}  # type: dict[Family, tuple[list[bytes], list[bytes]]]
        for p in artifact.peers:
            keys, values = peers[p.family]
            keys.append(peer_key(p.family, p.start, p.prefixlen))
            values.append(peer_value(p.identity))
        pol = list(policy_items(artifact.policy))
        names = artifact.identity_sets
        contents: dict[str, tuple[list[bytes], list[bytes]]] = {
            "stk_peers4": peers[Family.V4],
            "stk_peers6": peers[Family.V6],
            "stk_policy": ([k for k, _ in pol], [v for _, v in pol]),
            "stk_rules": (
                [struct.pack("=I", i) for i in range(len(artifact.rules))],
                [text_value(r, RULE_TEXT_SIZE) for r in artifact.rules],
            ),
            "stk_idents": (
                [struct.pack("=I", i) for i in range(len(names))],
                [text_value(" ".join(sorted(c)) or "-", IDENT_TEXT_SIZE) for c in names],
            ),
        }
        fresh: dict[str, bpf.BpfMap] = {}
        try:
            for name, (keys, values) in contents.items():
                fresh[name] = bpf.create_map(INNER[name])
                if keys:
                    fresh[name].update_batch(keys, values)
            for name, m in fresh.items():
                self.maps[name].set_inner(generation, m.fd)
        finally:
            for m in fresh.values():
                m.close()

    # ---- programs -----------------------------------------------------------------------
    def pinned_program_ids(self) -> dict[TcHook, int]:
        out: dict[TcHook, int] = {}
        for hook, _, pin_name in PROGRAMS:
            try:
                fd = bpf.open_pinned(self._pin(pin_name))
            except bpf.BpfError:
                continue
            try:
                out[hook] = bpf.prog_info(fd).id
            finally:
                bpf.close_fd(fd)
        return out

    def load_programs(self, obj: BpfObject) -> None:
        fds = {name: m.fd for name, m in self.maps.items()}
        for hook, section, pin_name in PROGRAMS:
            prog = obj.program(section)
            started = time.perf_counter()
            fd, _ = bpf.load_program(bpf.ProgType.SCHED_CLS, prog.with_maps(fds), obj.license, prog.name)
            elapsed = time.perf_counter() - started
            try:
                self.last_load[hook] = (bpf.prog_info(fd), elapsed)
                path = self._pin(pin_name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                bpf.pin(fd, path)
            finally:
                bpf.close_fd(fd)

    # ---- tc ----------------------------------------------------------------------------------
    def attachments(self) -> list[Attachment]:
        if self.netns is not None and not os.path.exists(f"/run/netns/{self.netns}"):
            return []
        found: list[Attachment] = []
        for iface in self.list_interfaces():
            for hook in TcHook:
                proc = self._run(["tc", "-j", "filter", "show", "dev", iface.name, hook.value], check=False)
                if proc.returncode != 0 or not proc.stdout.strip():
                    continue
                for f in json.loads(proc.stdout):
                    opts = f.get("options") or {}
                    if f.get("pref") != self.pref or f.get("kind") != "bpf" or opts.get("handle") != "0x1":
                        continue
                    prog = opts.get("prog") or {}
                    found.append(
                        Attachment(iface.name, hook, int(prog.get("id", 0)), str(prog.get("name", "")),
                                   str(prog.get("tag", "")))
                    )
        return sorted(found)

    def attach(self) -> list[str]:
        """Our filter on every interface (replacing only ours); returns the interfaces."""
        want = self.pinned_program_ids()
        have = {(a.interface, a.hook): a.prog_id for a in self.attachments()}
        done: list[str] = []
        for iface in self.list_interfaces():
            if iface.link_type != "ether":
                raise ApplyError(f"interface {iface.name}: link type {iface.link_type!r} is not Ethernet")
            qdisc = self._run(["tc", "qdisc", "add", "dev", iface.name, "clsact"], check=False)
            if qdisc.returncode != 0 and "File exists" not in qdisc.stderr and "Exclusivity" not in qdisc.stderr:
                raise ApplyError(f"tc qdisc add dev {iface.name} clsact: {qdisc.stderr.strip()}")
            for hook, _, pin_name in PROGRAMS:
                if have.get((iface.name, hook)) == want.get(hook):
                    continue
                self._run([
                    "tc", "filter", "replace", "dev", iface.name, hook.value, "pref", str(self.pref),
                    "handle", "1", "bpf", "direct-action", "object-pinned", self._pin(pin_name),
                ])  # fmt: skip
            done.append(iface.name)
        return done

    def detach(self) -> None:
        for a in self.attachments():
            self._run(
                ["tc", "filter", "del", "dev", a.interface, a.hook.value, "pref", str(self.pref), "handle", "1", "bpf"],
                check=False,
            )

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
    def tables(self, cur: Current) -> EbpfTables:
        """The generation in force as readable tables."""
        gen = cur.generation
        rules: dict[int, str] = {}
        idents: dict[int, str] = {}
        peers: list[PeerEntry] = []
        policy: list[Interval] = []
        for outer in ("stk_rules", "stk_idents", "stk_peers4", "stk_peers6", "stk_policy"):
            m = self.inner(outer, gen)
            if m is None:
                continue
            with m:
                for key, value in m.items():
                    if outer in ("stk_rules", "stk_idents"):
                        (index,) = struct.unpack("=I", key)
                        text = value.split(b"\0", 1)[0].decode(errors="replace")
                        (rules if outer == "stk_rules" else idents)[index] = text
                    elif outer == "stk_policy":
                        direction, ident, proto, first, last = decode_policy_key(key)
                        verdict, rule = struct.unpack("=B3xI", value)
                        policy.append(Interval(direction, ident, proto, first, last, Verdict(verdict), rule))
                    else:
                        family = Family.V4 if outer == "stk_peers4" else Family.V6
                        start, plen = decode_peer_key(family, key)
                        peers.append(PeerEntry(family, start, plen, struct.unpack("=I", value)[0]))
        rule_list = tuple(rules.get(i, "?") for i in range(max(rules, default=-1) + 1))
        return EbpfTables(
            cur.mode, rule_list, tuple(sorted(idents.items())), tuple(sorted(peers)), merge_intervals(policy)
        )

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


def load_object(path: Path) -> tuple[BpfObject, int]:
    data = path.read_bytes()
    return read_object(data), object_digest(data)
