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

import hashlib
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
from stockade.verify.ipset_readback import IpsetReadback, RangeCache, read_ipsets
from stockade.verify.ipt_readback import parse_ipset_save, parse_iptables_sets
from stockade.verify.loaded import LoadedRuleset
from stockade.verify.nft_netlink import parse_nft_dump
from stockade.verify.nft_readback import parse_nft_table
from stockade.verify.prove import Proof, prove

BACKENDS = ("nftables", "iptables-legacy", "iptables-nft", "ebpf")


def read_nftables(table: str = "stockade", netns: str | None = None, wg_interface: str | None = None) -> LoadedRuleset:
    """The table as the kernel holds it, over netlink (:mod:`.nft_netlink`); ``wg_interface``: the
    WireGuard interface of encrypted rules (None: tests of it are refused)."""
    try:
        dump = dump_table(table, netns)
    except BackendError as exc:
        raise ProofError(f"cannot read back nftables table {table}: {exc}") from exc
    return parse_nft_dump(dump, table, wg_interface)


def read_nftables_json(table: str = "stockade", netns: str | None = None) -> LoadedRuleset:
    """The same through ``nft -j list table`` (the reference the netlink reader is tested
    against, and the benchmark's side-by-side)."""
    try:
        items = NftRunner(netns).list_table_json(table)
    except BackendError as exc:
        raise ProofError(f"cannot read back nftables table {table}: {exc}") from exc
    return parse_nft_table(items, table)


class RuleParseCache:
    """The last parse of each (namespace, variant, tunnel interface)'s saves: reused when both saves'
    text is the same (but for ``#`` lines and chain counters, which the parser skips) and the ipsets
    given are the same objects (:class:`~.ipset_readback.RangeCache` hands out the same object for a
    set whose dump did not change). Only the latest parse per key is kept."""

    def __init__(self) -> None:
        self._last: dict[tuple[str | None, str, str | None], tuple[bytes, IpsetReadback, LoadedRuleset]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def digest(*saves: str) -> bytes:
        h = hashlib.blake2b(digest_size=20)
        for text in saves:
            lines = [line.partition(" [")[0] if line.startswith(":") else line
                     for line in text.splitlines() if not line.startswith("#")]
            h.update("\n".join(lines).encode() + b"\0")
        return h.digest()

    def parse(self, netns: str | None, variant: IptablesVariant, wg_interface: str | None,
              saves: tuple[str, str], sets: IpsetReadback) -> LoadedRuleset:
        key = (netns, variant.value, wg_interface)
        digest = self.digest(*saves)
        with self._lock:
            last = self._last.get(key)
        if last is not None and last[0] == digest and _same_sets(last[1], sets):
            return last[2]
        loaded = parse_iptables_sets(*saves, sets.sets, variant=variant.value, wg_interface=wg_interface,
                                     unmodelled=sets.unmodelled)
        with self._lock:
            self._last[key] = (digest, sets, loaded)
        return loaded


def _same_sets(a: IpsetReadback, b: IpsetReadback) -> bool:
    """The same names, each the same decoded object, and the same left-out sets."""
    return (a.unmodelled == b.unmodelled and a.sets.keys() == b.sets.keys()
            and all(v is b.sets[k] for k, v in a.sets.items()))


SET_RANGES = RangeCache()
RULE_PARSES = RuleParseCache()


def read_iptables(variant: IptablesVariant, netns: str | None = None, wg_interface: str | None = None) -> LoadedRuleset:
    """Both families' saves and the ipsets (over netlink), read at once, then parsed."""
    runner = IptablesRunner(variant, netns)
    with ThreadPoolExecutor(3) as pool:
        saves = [pool.submit(runner.checked, Command((variant.tool(f, "save"),))) for f in (Family.V4, Family.V6)]
        ipsets = pool.submit(read_ipsets, netns, SET_RANGES)
        try:
            v4, v6 = (f.result() for f in saves)
        except BackendError as exc:
            raise ProofError(f"cannot read back iptables-{variant.value}: {exc}") from exc
        sets = ipsets.result()
    return RULE_PARSES.parse(netns, variant, wg_interface, (v4, v6), sets)


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
