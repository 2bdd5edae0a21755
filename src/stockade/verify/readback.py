"""Read back what a Linux backend has LOADED (not what it rendered) and prove it against a HostPolicy.

The thin I/O edge of :mod:`stockade.verify`: it runs the listing tools through the backends'
own runners (argv lists, names validated, in a network namespace when given) and hands their
output to the pure parsers. Any failure to read is a :class:`~stockade.errors.ProofError`:
a proof that could not look at the kernel is not a proof.

* nftables: the table's chains, rules, sets and elements dumped over netlink
  (:mod:`stockade.backends.nftables.dump`; ``nft -j list table inet <table>`` as the reference);
* iptables (legacy or nft): ``iptables-save``, ``ip6tables-save`` (every table: the filter
  table is modelled, the others are listed in the proof's notes) and the ipsets over netlink
  (:mod:`.ipset_readback`; ``ipset save`` and its parser as the reference), the three at once;
  between proofs, sets whose dumped bytes did not change keep their decoded ranges
  (:data:`SET_RANGES`) and saves whose text did not change keep their parse (:data:`RULE_PARSES`);
* eBPF: the tc programs attached (by tag) and the maps in force, over the bpf syscall
  (:mod:`.ebpf_readback`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import IptablesVariant
from stockade.backends.iptables.runner import Command, IptablesRunner
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.dump import dump_table
from stockade.backends.nftables.runner import NftRunner
from stockade.compiler.ir import HostPolicy
from stockade.errors import BackendError, ProofError
from stockade.model.addresses import Family, IPAddress
from stockade.verify.ebpf_readback import read_ebpf
from stockade.verify.ipset_readback import NAMESPACES_KEPT, RangeCache, read_ipsets
from stockade.verify.ipt_readback import parse_ipset_save, parse_iptables_sets
from stockade.verify.ipt_state import RuleParseCache, nft_token, rules_token
from stockade.verify.loaded import LoadedRuleset
from stockade.verify.nft_netlink import parse_nft_dump
from stockade.verify.nft_readback import parse_nft_table
from stockade.verify.nft_wire import SET_ANONYMOUS, SET_MAP, TYPE_BITS
from stockade.verify.prove import Proof, prove

BACKENDS = ("nftables", "iptables-legacy", "iptables-nft", "ebpf")


NFT_SET_TIMEOUT = 0x10  # elements expire without a commit (an element timeout needs this flag)


class NftGenerationCache:
    """The last nftables read-back per (namespace, table, tunnel interface), with the nf_tables
    generation id taken before its dump (with the namespace's identity: :func:`.ipt_state.nft_token`):
    reused while the id is unchanged (every change to a table,
    its rules, sets or elements is a committed transaction that bumps it), unless a set of the table
    lets elements expire (no commit) or the id cannot be read. The contents of dynamic sets, which
    the datapath fills without commits, are not part of the read-back (:mod:`.nft_netlink`). Only
    the :data:`NAMESPACES_KEPT` most recently read are kept."""

    def __init__(self) -> None:
        self._last: dict[tuple[str | None, str, str | None], tuple[object, LoadedRuleset]] = {}
        self._lock = threading.Lock()

    def read(self, table: str, netns: str | None, wg_interface: str | None) -> LoadedRuleset:
        key = (netns, table, wg_interface)
        gen = nft_token(netns)
        with self._lock:
            last = self._last.get(key)
        if gen is not None and last is not None and last[0] == gen:
            return last[1]
        try:
            dump = dump_table(table, netns)
        except BackendError as exc:
            raise ProofError(f"cannot read back nftables table {table}: {exc}") from exc
        loaded = parse_nft_dump(dump, table, wg_interface)
        expiring = dump is not None and any(_expiring(s) for s in dump.sets)
        with self._lock:
            self._last.pop(key, None)
            if gen is not None and not expiring:
                self._last[key] = (gen, loaded)
            while len(self._last) > NAMESPACES_KEPT:
                del self._last[next(iter(self._last))]
        return loaded


def _expiring(set_attrs: dict[int, bytes]) -> bool:
    """A set whose elements may expire and whose contents the read-back holds (every set but the
    dynamic, concatenated ones the datapath fills: :mod:`.nft_netlink`)."""
    flags = int.from_bytes(set_attrs.get(3, b"\0\0\0\0")[:4], "big")
    key_type = int.from_bytes(set_attrs.get(4, b"\0\0\0\0")[:4], "big")
    dynamic = not flags & (SET_MAP | SET_ANONYMOUS) and key_type >> TYPE_BITS
    return bool(flags & NFT_SET_TIMEOUT) and not dynamic


NFT_PARSES = NftGenerationCache()


def read_nftables(table: str = "stockade", netns: str | None = None, wg_interface: str | None = None) -> LoadedRuleset:
    """The table as the kernel holds it, over netlink (:mod:`.nft_netlink`); ``wg_interface``: the
    WireGuard interface of encrypted rules (None: tests of it are refused). Unchanged since the last
    read-back (the same nf_tables generation): that read-back (:class:`NftGenerationCache`)."""
    return NFT_PARSES.read(table, netns, wg_interface)


def read_nftables_json(table: str = "stockade", netns: str | None = None) -> LoadedRuleset:
    """The same through ``nft -j list table`` (the reference the netlink reader is tested
    against, and the benchmark's side-by-side)."""
    try:
        items = NftRunner(netns).list_table_json(table)
    except BackendError as exc:
        raise ProofError(f"cannot read back nftables table {table}: {exc}") from exc
    return parse_nft_table(items, table)


SET_RANGES = RangeCache()
RULE_PARSES = RuleParseCache()


def read_iptables(variant: IptablesVariant, netns: str | None = None, wg_interface: str | None = None) -> LoadedRuleset:
    """The rules' token (:mod:`.ipt_state`) and the ipsets (over netlink), read at once; when the
    token and the sets are those of the last read-back, its parse; else both families' saves, read
    at once, then parsed."""
    runner = IptablesRunner(variant, netns)
    key = (netns, variant.value, wg_interface)
    with ThreadPoolExecutor(2) as pool:
        token_read = pool.submit(rules_token, variant, netns)
        ipsets = pool.submit(read_ipsets, netns, SET_RANGES)
        token, sets = token_read.result(), ipsets.result()
        kept = RULE_PARSES.unchanged(key, token, sets)
        if kept is not None:
            return kept
        saves = [pool.submit(runner.checked, Command((variant.tool(f, "save"),))) for f in (Family.V4, Family.V6)]
        try:
            v4, v6 = (f.result() for f in saves)
        except BackendError as exc:
            raise ProofError(f"cannot read back iptables-{variant.value}: {exc}") from exc
    return RULE_PARSES.parse(key, token, (v4, v6), sets)


def read_iptables_text(variant: IptablesVariant, netns: str | None = None,
                       wg_interface: str | None = None) -> LoadedRuleset:
    """The same through ``ipset save`` and the whole-line parse, one after another, nothing kept
    (the reference the fast read-back is tested against, and the benchmark's side-by-side)."""
    runner = IptablesRunner(variant, netns)
    try:
        saves = [runner.checked(Command((variant.tool(f, "save"),))) for f in (Family.V4, Family.V6)]
        ipsets = runner.ipset_save()
    except BackendError as exc:
        raise ProofError(f"cannot read back iptables-{variant.value}: {exc}") from exc
    return parse_iptables_sets(saves[0], saves[1], parse_ipset_save(ipsets), variant=variant.value,
                               wg_interface=wg_interface, whole_lines=True)


def read_loaded(backend: str, *, netns: str | None = None, table: str = "stockade",
                wg_interface: str | None = None) -> LoadedRuleset:
    """The read-back of ``backend`` (one of :data:`BACKENDS`; ``iptables`` means the nft variant);
    ``wg_interface``: the WireGuard interface of encrypted rules (None: their steering is refused)."""
    if backend == "nftables":
        return read_nftables(table, netns, wg_interface)
    if backend in ("iptables", "iptables-nft"):
        return read_iptables(IptablesVariant.NFT, netns, wg_interface)
    if backend == "iptables-legacy":
        return read_iptables(IptablesVariant.LEGACY, netns, wg_interface)
    if backend == "ebpf":
        return read_ebpf(table, netns, wg_interface)
    raise ProofError(f"no read-back for backend {backend!r} (provable: {', '.join(BACKENDS)})")


def read_backend(backend: object) -> LoadedRuleset | None:
    """What ``backend`` (a backend object, as the agent holds it) has loaded; None for a backend the
    prover cannot read back (Windows, devices)."""
    netns = getattr(backend, "netns", None)
    if isinstance(backend, NftablesBackend):
        return read_nftables(backend.table, netns, backend.wireguard.name if backend.wireguard is not None else None)
    if isinstance(backend, IptablesBackend):
        return read_iptables(backend.variant, netns, backend.wireguard.name if backend.wireguard is not None else None)
    if isinstance(backend, EbpfBackend):
        return read_ebpf(backend.table, netns, backend.wireguard.name if backend.wireguard is not None else None)
    return None


def prove_backend(hp: HostPolicy, backend: object, *, hints: Iterable[IPAddress] = ()) -> Proof | None:
    """Prove ``hp`` against what ``backend`` has loaded; None when it cannot be read back."""
    loaded = read_backend(backend)
    return None if loaded is None else prove(hp, loaded, hints=hints)


def prove_loaded(
    hp: HostPolicy,
    backend: str,
    *,
    netns: str | None = None,
    table: str = "stockade",
    hints: Iterable[IPAddress] = (),
    wg_interface: str | None = None,
) -> Proof:
    """Read back ``backend`` and prove it against ``hp``."""
    return prove(hp, read_loaded(backend, netns=netns, table=table, wg_interface=wg_interface), hints=hints)
