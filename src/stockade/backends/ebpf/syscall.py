"""The ``bpf()`` system call through ctypes: maps, programs, pins and object info.

Only what Stockade's eBPF backend needs, written against the kernel's UAPI
(``include/uapi/linux/bpf.h``): ``union bpf_attr`` is built as a zeroed byte buffer with
fields packed at their documented offsets, so unused trailing fields are always zero
(the kernel rejects non-zero bytes past the fields it knows).

Every failure raises :class:`BpfError` (an ``ApplyError``) with the command, errno and,
for program loads, the verifier's log.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

from stockade.errors import ApplyError

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
ATTR_SIZE = 144  # covers every field we use; the rest stays zero


class BpfError(ApplyError):
    """A bpf() command failed."""

    def __init__(self, what: str, err: int, log: str = "") -> None:
        self.errno = err
        self.log = log
        detail = f"{what}: {os.strerror(err)} (errno {err})"
        if log:
            detail += "\n" + log[-4000:]
        super().__init__(detail)


class Cmd(IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    MAP_LOOKUP_BATCH = 24
    MAP_UPDATE_BATCH = 26


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    RINGBUF = 27


class ProgType(IntEnum):
    SCHED_CLS = 3


BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
F_NO_PREALLOC = 1
F_INNER_MAP = 0x1000
_ENOTSUPP = 524  # the kernel's internal "operation not supported" (no errno name)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _nr() -> int:
    try:
        return _SYSCALL_NR[platform.machine()]
    except KeyError:
        raise ApplyError(f"bpf(): unsupported architecture {platform.machine()}") from None


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def _syscall(cmd: Cmd, attr: ctypes.Array[ctypes.c_char]) -> int:
    # explicit C types: a bare Python int would be passed as a 32-bit int to the variadic call
    return int(
        _libc.syscall(
            ctypes.c_long(_nr()), ctypes.c_long(int(cmd)), ctypes.c_void_p(ctypes.addressof(attr)),
            ctypes.c_uint(len(attr)),
        )
    )


def sys_bpf(cmd: Cmd, attr: ctypes.Array[ctypes.c_char], what: str = "") -> int:
    """Run one command; returns the kernel's answer (an fd for creating commands)."""
    ret = _syscall(cmd, attr)
    if ret < 0:
        raise BpfError(what or cmd.name, ctypes.get_errno())
    return ret


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed ``bpf_attr`` with each (offset, struct format, value) packed in."""
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def _name16(name: str) -> bytes:
    return name.encode()[:15].ljust(16, b"\0")


def close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


# ---- maps -------------------------------------------------------------------------


@dataclass(frozen=True)
class MapSpec:
    """How to create one map."""

    name: str
    type: MapType
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


class BpfMap:
    """An open map file descriptor with its key and value sizes. Close it (or use ``with``)."""

    def __init__(self, fd: int, key_size: int, value_size: int, map_type: MapType, name: str = "") -> None:
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self.type = map_type
        self.name = name

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check_key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ApplyError(f"map {self.name}: key of {len(key)} bytes, expected {self.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def _value_buffer(self) -> ctypes.Array[ctypes.c_char]:
        size = self.value_size
        if self.type is MapType.PERCPU_ARRAY:
            size = _round8(size) * possible_cpus()
        return ctypes.create_string_buffer(size)

    @staticmethod
    def _unless_absent(cmd: Cmd, attr: ctypes.Array[ctypes.c_char], what: str) -> bool:
        """Run ``cmd`` on an element; False when the key is absent (ENOENT)."""
        try:
            sys_bpf(cmd, attr, what)
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def _lookup_into(self, k: ctypes.Array[ctypes.c_char], v: ctypes.Array[ctypes.c_char], what: str) -> bool:
        """MAP_LOOKUP_ELEM of ``k`` into ``v``; False when the key is absent."""
        attr = _attr((0, "I", self.fd), (8, "Q", _addr(k)), (16, "Q", _addr(v)))
        return self._unless_absent(Cmd.MAP_LOOKUP_ELEM, attr, f"lookup in {what} {self.name}")

    def lookup(self, key: bytes) -> bytes | None:
        v = self._value_buffer()
        return v.raw if self._lookup_into(self._check_key(key), v, "map") else None

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k = self._check_key(key)
        if len(value) != self.value_size:
            raise ApplyError(f"map {self.name}: value of {len(value)} bytes, expected {self.value_size}")
        v = ctypes.create_string_buffer(value, len(value))
        attr = _attr((0, "I", self.fd), (8, "Q", _addr(k)), (16, "Q", _addr(v)), (24, "Q", flags))
        sys_bpf(Cmd.MAP_UPDATE_ELEM, attr, f"update of map {self.name}")

    def set_inner(self, index: int, inner_fd: int) -> None:
        """Array of maps: put the map ``inner_fd`` at ``index``."""
        k = ctypes.create_string_buffer(struct.pack("I", index), 4)
        v = ctypes.create_string_buffer(struct.pack("I", inner_fd), 4)
        attr = _attr((0, "I", self.fd), (8, "Q", _addr(k)), (16, "Q", _addr(v)), (24, "Q", BPF_ANY))
        sys_bpf(Cmd.MAP_UPDATE_ELEM, attr, f"update of map-in-map {self.name}")

    def inner_id(self, index: int) -> int | None:
        """Array of maps: the id of the map at ``index`` (None when empty)."""
        k = ctypes.create_string_buffer(struct.pack("I", index), 4)
        v = ctypes.create_string_buffer(4)
        return int(struct.unpack("I", v.raw)[0]) if self._lookup_into(k, v, "map-in-map") else None

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was not there. Keys must have zeroed padding."""
        k = self._check_key(key)
        attr = _attr((0, "I", self.fd), (8, "Q", _addr(k)))
        return self._unless_absent(Cmd.MAP_DELETE_ELEM, attr, f"delete from map {self.name}")

    def keys(self) -> Iterator[bytes]:
        """Every key (a concurrent writer may make this skip or repeat keys)."""
        nxt = ctypes.create_string_buffer(self.key_size)
        attr = _attr((0, "I", self.fd), (8, "Q", 0), (16, "Q", _addr(nxt)))
        while True:
            try:
                sys_bpf(Cmd.MAP_GET_NEXT_KEY, attr, f"iterating map {self.name}")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise
            key = nxt.raw
            yield key
            cur = ctypes.create_string_buffer(key, len(key))  # alive until the next call returns
            attr = _attr((0, "I", self.fd), (8, "Q", _addr(cur)), (16, "Q", _addr(nxt)))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value), in batches where the map type has them (per-CPU maps: one by one)."""
        if self.type in (MapType.HASH, MapType.LRU_HASH, MapType.LPM_TRIE):
            try:
                yield from self._items_batched()
                return
            except _NoBatch:
                pass
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def _items_batched(self, chunk: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        ks, vs = self.key_size, self.value_size
        kbuf = ctypes.create_string_buffer(ks * chunk)
        vbuf = ctypes.create_string_buffer(vs * chunk)
        out_batch = ctypes.create_string_buffer(max(ks, 8))
        in_batch = ctypes.create_string_buffer(max(ks, 8))
        first = True
        while True:
            attr = _attr(
                (0, "Q", 0 if first else _addr(in_batch)), (8, "Q", _addr(out_batch)), (16, "Q", _addr(kbuf)),
                (24, "Q", _addr(vbuf)), (32, "I", chunk), (36, "I", self.fd),
            )  # fmt: skip
            done = False
            try:
                sys_bpf(Cmd.MAP_LOOKUP_BATCH, attr, f"batch lookup in map {self.name}")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    done = True
                elif first and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                    raise _NoBatch from None
                else:
                    raise
            count = int(struct.unpack_from("I", attr, 32)[0])
            kraw, vraw = kbuf.raw, vbuf.raw
            for i in range(count):
                yield kraw[i * ks : (i + 1) * ks], vraw[i * vs : (i + 1) * vs]
            if done:
                return
            first = False
            ctypes.memmove(in_batch, out_batch, len(out_batch))

    def update_batch(self, keys: Sequence[bytes], values: Sequence[bytes], chunk: int = 65536) -> None:
        """Insert many entries with few syscalls (element by element if the map type lacks batches)."""
        if len(keys) != len(values):
            raise ApplyError(f"map {self.name}: {len(keys)} keys but {len(values)} values")
        for start in range(0, len(keys), chunk):
            ks = keys[start : start + chunk]
            vs = values[start : start + chunk]
            kraw, vraw = b"".join(ks), b"".join(vs)
            if len(kraw) != len(ks) * self.key_size or len(vraw) != len(vs) * self.value_size:
                raise ApplyError(f"map {self.name}: batch with a wrongly sized key or value")
            kbuf = ctypes.create_string_buffer(kraw, len(kraw))
            vbuf = ctypes.create_string_buffer(vraw, len(vraw))
            attr = _attr((16, "Q", _addr(kbuf)), (24, "Q", _addr(vbuf)), (32, "I", len(ks)), (36, "I", self.fd))
            try:
                sys_bpf(Cmd.MAP_UPDATE_BATCH, attr, f"batch update of map {self.name}")
            except BpfError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
                    raise
                done = int(struct.unpack_from("I", attr, 32)[0])
                for k, v in zip(ks[done:], vs[done:], strict=True):
                    self.update(k, v)


class _NoBatch(Exception):
    """The map type has no batch lookup: iterate key by key."""


def _round8(n: int) -> int:
    return (n + 7) & ~7


_POSSIBLE: list[int] = []


def possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values hold one slot each)."""
    if not _POSSIBLE:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        total = 0
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            total += (int(hi) if hi else int(lo)) - int(lo) + 1
        _POSSIBLE.append(total)
    return _POSSIBLE[0]


def create_map(spec: MapSpec, inner: BpfMap | None = None) -> BpfMap:
    attr = _attr(
        (0, "I", int(spec.type)),
        (4, "I", spec.key_size),
        (8, "I", spec.value_size),
        (12, "I", spec.max_entries),
        (16, "I", spec.flags),
        (20, "I", inner.fd if inner is not None else 0),
    )
    ctypes.memmove(ctypes.addressof(attr) + 28, _name16(spec.name), 16)
    fd = sys_bpf(Cmd.MAP_CREATE, attr, f"creating map {spec.name}")
    return BpfMap(fd, spec.key_size, spec.value_size, spec.type, spec.name)


# ---- programs ---------------------------------------------------------------------


def load_program(
    prog_type: ProgType, insns: bytes, license: str, name: str, *, log_size: int = 1 << 22
) -> tuple[int, str]:
    """Load (verify) a program; returns (fd, verifier log). The log is fetched only on failure."""
    lic = ctypes.create_string_buffer(license.encode() + b"\0")
    code = ctypes.create_string_buffer(insns, len(insns))

    def attempt(level: int) -> tuple[int, str]:
        log = ctypes.create_string_buffer(log_size) if level else None
        attr = _attr(
            (0, "I", int(prog_type)),
            (4, "I", len(insns) // 8),
            (8, "Q", _addr(code)),
            (16, "Q", _addr(lic)),
            (24, "I", level),
            (28, "I", log_size if level else 0),
            (32, "Q", _addr(log)),
        )
        ctypes.memmove(ctypes.addressof(attr) + 48, _name16(name), 16)
        ret = _syscall(Cmd.PROG_LOAD, attr)
        text = log.value.decode(errors="replace") if log is not None else ""
        if ret < 0:
            raise BpfError(f"loading program {name}", ctypes.get_errno(), text)
        return ret, text

    try:
        return attempt(0)
    except BpfError as first:
        if first.errno in (errno.EPERM, errno.ENOENT):
            raise
        try:  # again with the verifier's log, to say why
            fd, _ = attempt(1)
        except BpfError as detailed:
            raise detailed from None
        close_fd(fd)
        raise


# ---- pins and ids ----------------------------------------------------------------


def pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode() + b"\0")
    sys_bpf(Cmd.OBJ_PIN, _attr((0, "Q", _addr(p)), (8, "I", fd)), f"pinning {path}")


def open_pinned(path: str) -> int:
    """An fd for the object pinned at ``path``; BpfError(ENOENT) when nothing is there."""
    p = ctypes.create_string_buffer(path.encode() + b"\0")
    return sys_bpf(Cmd.OBJ_GET, _attr((0, "Q", _addr(p))), f"opening pinned {path}")


def map_fd_by_id(map_id: int) -> int:
    return sys_bpf(Cmd.MAP_GET_FD_BY_ID, _attr((0, "I", map_id)), f"opening map id {map_id}")


def prog_fd_by_id(prog_id: int) -> int:
    return sys_bpf(Cmd.PROG_GET_FD_BY_ID, _attr((0, "I", prog_id)), f"opening program id {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    name: str
    tag: str
    xlated_len: int  # bytes of the translated program (8 per instruction)
    jited_len: int
    verified_insns: int  # instructions the verifier processed (0 on kernels before 5.16)
    map_ids: tuple[int, ...]

    @property
    def insn_count(self) -> int:
        return self.xlated_len // 8


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def _info(fd: int, size: int, extra: tuple[tuple[int, str, int], ...] = ()) -> ctypes.Array[ctypes.c_char]:
    info = ctypes.create_string_buffer(size)
    for offset, fmt, value in extra:
        struct.pack_into(fmt, info, offset, value)
    attr = _attr((0, "I", fd), (4, "I", size), (8, "Q", _addr(info)))
    sys_bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, "object info")
    return info


def prog_info(fd: int) -> ProgInfo:
    first = _info(fd, 232)
    nr_maps = struct.unpack_from("I", first, 52)[0]
    ids = ctypes.create_string_buffer(4 * max(nr_maps, 1))
    info = _info(fd, 232, ((52, "I", nr_maps), (56, "Q", _addr(ids))))
    prog_id = struct.unpack_from("I", info, 4)[0]
    tag = bytes(info.raw[8:16]).hex()
    jited, xlated = struct.unpack_from("II", info, 16)
    name = info.raw[64:80].split(b"\0", 1)[0].decode()
    verified = struct.unpack_from("I", info, 216)[0]
    map_ids = struct.unpack_from(f"{nr_maps}I", ids, 0) if nr_maps else ()
    return ProgInfo(prog_id, name, tag, xlated, jited, verified, tuple(map_ids))


def map_info(fd: int) -> MapInfo:
    info = _info(fd, 88)
    mtype, mid, ks, vs, me, flags = struct.unpack_from("6I", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mid, mtype, ks, vs, me, flags, name)


def open_map(fd: int) -> BpfMap:
    """Wrap an fd from ``open_pinned``/``map_fd_by_id`` with its sizes."""
    info = map_info(fd)
    try:
        mtype = MapType(info.type)
    except ValueError:
        close_fd(fd)
        raise ApplyError(f"map {info.name} has unexpected type {info.type}") from None
    return BpfMap(fd, info.key_size, info.value_size, mtype, info.name)
