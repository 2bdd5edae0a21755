"""An exact "has any iptables rule changed since the last read-back?" token, so a periodic re-proof
need not run ``iptables-save`` again (1-4 s of CPU per family at 1,000 rules).

* **iptables-nft**: the nf_tables generation id of the namespace
  (:func:`stockade.backends.iptables.generation.nft_generation`): every committed nf_tables
  transaction, to any table, bumps it, and iptables-nft's rules live only in nf_tables.
* **iptables-legacy**: x_tables has no generation counter, so the token is a digest of every
  table the namespace has (``/proc/net/ip_tables_names``, ``ip6_tables_names``): its
  ``IPT_SO_GET_INFO`` (hooks, entry count, size) and its whole rule blob
  (``IPT_SO_GET_ENTRIES``, what ``iptables-save`` itself reads) with each entry's packet and byte
  counters left out (they change with traffic, not with rules). Equal digests mean equal tables.

The token is taken *before* the saves run: a change during the read makes the next token differ.
An ``-m set`` rule names its set by kernel index; the read-back therefore also requires the same set
names in the same (index) order before it reuses a parse. ``None`` means "unknown": read everything.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Hashable
from dataclasses import dataclass

from stockade.backends.common import in_netns, netns_path
from stockade.backends.iptables.generation import nft_generation
from stockade.backends.iptables.model import IptablesVariant
from stockade.errors import BackendError
from stockade.verify.ipset_readback import NAMESPACES_KEPT, IpsetReadback
from stockade.verify.ipt_readback import parse_iptables_sets
from stockade.verify.loaded import LoadedRuleset

SO_GET_INFO = 64  # IPT_SO_GET_INFO / IP6T_SO_GET_INFO
SO_GET_ENTRIES = 65
GETINFO_SIZE = 84  # name[32], valid_hooks, hook_entry[5], underflow[5], num_entries, size
ENTRIES_HEADER = 40  # struct ipt_get_entries: name[32], size, then the 8-aligned entry table
# per family: (socket family, level, names file, offset of next_offset in an entry, of the counters)
FAMILIES = (
    (socket.AF_INET, socket.IPPROTO_IP, "ip_tables_names", 90, 96),  # struct ipt_entry: 112 bytes
    (socket.AF_INET6, socket.IPPROTO_IPV6, "ip6_tables_names", 142, 152),  # struct ip6t_entry: 168 bytes
)
COUNTERS = 16  # struct xt_counters: pcnt, bcnt
_libc = ctypes.CDLL(None, use_errno=True)


class _Unknown(Exception):
    pass


def _getsockopt(sock: socket.socket, level: int, opt: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    size = ctypes.c_uint(len(buf))
    if _libc.getsockopt(sock.fileno(), level, opt, buf, ctypes.byref(size)) != 0:
        raise _Unknown(errno.errorcode.get(ctypes.get_errno(), "?"))
    return size.value


def _table(sock: socket.socket, level: int, name: str, next_at: int, counters_at: int,
           h: hashlib.blake2b) -> None:
    """Digest one table: its info, then its entries without their counters."""
    for _ in range(5):  # the table changed between the two calls: EAGAIN, ask again
        info = ctypes.create_string_buffer(name.encode(), GETINFO_SIZE)
        _getsockopt(sock, level, SO_GET_INFO, info)
        size = struct.unpack_from("=I", info.raw, GETINFO_SIZE - 4)[0]
        entries = ctypes.create_string_buffer(ENTRIES_HEADER + size)
        entries.raw = name.encode().ljust(32, b"\0") + struct.pack("=I", size)
        try:
            _getsockopt(sock, level, SO_GET_ENTRIES, entries)
        except _Unknown as exc:
            if str(exc) == "EAGAIN":
                continue
            raise
        blob = memoryview(entries.raw)[ENTRIES_HEADER:]
        h.update(name.encode() + b"\0" + info.raw[32:])
        off = 0
        while off < size:
            (step,) = struct.unpack_from("=H", blob, off + next_at)
            if step < counters_at + COUNTERS or off + step > size:
                raise _Unknown(f"malformed entry at {off} of {name}")
            h.update(blob[off : off + counters_at])
            h.update(blob[off + counters_at + COUNTERS : off + step])
            off += step
        return
    raise _Unknown(f"{name} kept changing")


def legacy_token(netns: str | None) -> bytes | None:
    """The digest of every x_tables table of ``netns`` (see the module docstring); None if unknown."""

    def read() -> bytes:
        h = hashlib.blake2b(digest_size=20)
        for family, level, names_file, next_at, counters_at in FAMILIES:
            try:
                with open(f"/proc/thread-self/net/{names_file}") as f:
                    names = sorted(f.read().split())
            except FileNotFoundError:
                names = []
            h.update(f"{family}:{','.join(names)};".encode())
            with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
                for name in names:
                    _table(sock, level, name, next_at, counters_at, h)
        return h.digest()

    try:
        return in_netns(netns, read)
    except (_Unknown, OSError, BackendError):
        return None


def netns_identity(netns: str | None) -> tuple[int, int] | None:
    """The namespace itself (device and inode of its nsfs file), so a namespace deleted and made
    again under the same name, whose generation id starts over, is never taken for the old one."""
    try:
        st = os.stat(netns_path(netns) if netns is not None else "/proc/thread-self/ns/net")
    except (OSError, BackendError):
        return None
    return st.st_dev, st.st_ino


def nft_token(netns: str | None) -> tuple[tuple[int, int], int] | None:
    """The namespace and its nf_tables generation id; None when either cannot be read."""
    ident = netns_identity(netns)
    gen = nft_generation(netns)
    return None if ident is None or gen is None or ident != netns_identity(netns) else (ident, gen)


def rules_token(variant: IptablesVariant, netns: str | None) -> Hashable | None:
    """The token of every rule ``variant`` holds in ``netns``; None when it cannot be read."""
    if variant is IptablesVariant.NFT:
        nft = nft_token(netns)
        return None if nft is None else ("nft", nft)
    token = legacy_token(netns)
    return None if token is None else ("legacy", token)


# ---- what is kept between read-backs ---------------------------------------------------------

Key = tuple[str | None, str, str | None]  # namespace, variant, WireGuard interface


@dataclass(frozen=True)
class _Kept:
    token: Hashable | None  # the rules' token taken before the saves were read
    digest: bytes  # of the saves' text
    sets: IpsetReadback
    loaded: LoadedRuleset


def same_sets(a: IpsetReadback, b: IpsetReadback) -> bool:
    """Every set's name in the same (kernel index) order, each modelled set the same decoded object
    (:class:`~.ipset_readback.RangeCache` hands out the same object while a set's dump is the
    same), and the same sets left out."""
    return (a.order == b.order and a.unmodelled == b.unmodelled and a.sets.keys() == b.sets.keys()
            and all(v is b.sets[k] for k, v in a.sets.items()))


class RuleParseCache:
    """The last parse per (namespace, variant, tunnel interface), for the :data:`NAMESPACES_KEPT`
    read most recently. Reused without reading the
    saves when the rules' token is known and unchanged and the sets are the same
    (:meth:`unchanged`); reused after reading them when their text is the same but for ``#``
    lines and chain counters, which the parser skips (:meth:`parse`)."""

    def __init__(self) -> None:
        self._last: dict[Key, _Kept] = {}
        self._lock = threading.Lock()

    @staticmethod
    def digest(*saves: str) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        for text in saves:
            lines = [line.partition(" [")[0] if line.startswith(":") else line
                     for line in text.splitlines() if not line.startswith("#")]
            h.update("\n".join(lines).encode() + b"\0")
        return h.digest()

    def unchanged(self, key: Key, token: Hashable | None, sets: IpsetReadback) -> LoadedRuleset | None:
        with self._lock:
            last = self._last.get(key)
        if token is None or last is None or last.token != token or not same_sets(last.sets, sets):
            return None
        return last.loaded

    def parse(self, key: Key, token: Hashable | None, saves: tuple[str, str], sets: IpsetReadback) -> LoadedRuleset:
        digest = self.digest(*saves)
        with self._lock:
            last = self._last.get(key)
        if last is not None and last.digest == digest and same_sets(last.sets, sets):
            loaded = last.loaded
        else:
            loaded = parse_iptables_sets(*saves, sets.sets, variant=key[1], wg_interface=key[2],
                                         unmodelled=sets.unmodelled)
        with self._lock:
            self._last.pop(key, None)
            self._last[key] = _Kept(token, digest, sets, loaded)
            while len(self._last) > NAMESPACES_KEPT:
                del self._last[next(iter(self._last))]
        return loaded
