"""Read-back time per host, old vs new side by side: 10 / 100 / 1,000 rules x 100 / 10,000 / 100,000 peers.

For each size the seeded random HostPolicy of ``bench/verify.py`` (same seeds, ``identities`` shape)
is loaded into a fresh network namespace by the backend, then read back three ways, interleaved:

* ``old``: the read-back as it was: for iptables ``iptables-save`` + ``ip6tables-save`` + ``ipset
  save`` one after another, every line parsed whole (:func:`read_iptables_text`); for nftables
  ``nft -j list table`` and its parser (the netlink reader replaced it in session 6);
* ``new``: what the proof uses now (:func:`read_loaded`), first read in the namespace (nothing kept);
* ``again``: the same read once more, nothing changed in between (a periodic re-proof: the sets'
  ranges and the saves' parse are kept, the kernel is still read).

Wall seconds and CPU seconds (this process, its threads and children: the tools; the kernel's time
answering dumps included) per read; ``same`` says the new read-back equals the old one (iptables;
nftables's two readers are compared by tests/kernel/test_verify_nft_netlink.py). The load average
is printed on every row.

Run as root:  python bench/readback.py [--backends iptables-legacy,iptables-nft,nftables,ebpf]
              [--rules 10,100,1000] [--peers 100,10000,100000] [--no-old]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import time
import uuid
from collections.abc import Callable
from functools import partial

from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import IptablesVariant
from stockade.backends.nftables.backend import NftablesBackend
from stockade.verify.loaded import LoadedRuleset
from stockade.verify.readback import read_iptables_text, read_loaded, read_nftables_json
from stockade.verify.samples import random_host_policy


def _backend(name: str, ns: str) -> NftablesBackend | IptablesBackend | EbpfBackend:
    if name == "nftables":
        return NftablesBackend("stkbench", netns=ns)
    if name == "ebpf":
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        return EbpfBackend(netns=ns, table="stkbench")
    return IptablesBackend(netns=ns, variant=_variant(name))


def _variant(name: str) -> IptablesVariant:
    return IptablesVariant.LEGACY if name == "iptables-legacy" else IptablesVariant.NFT


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(read: Callable[[], LoadedRuleset]) -> tuple[LoadedRuleset, float, float]:
    c0, t0 = _cpu(), time.perf_counter()
    loaded = read()
    return loaded, time.perf_counter() - t0, _cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="iptables-legacy,iptables-nft,nftables,ebpf")
    ap.add_argument("--rules", default="10,100,1000")
    ap.add_argument("--peers", default="100,10000,100000")
    ap.add_argument("--no-old", action="store_true", help="skip the old read-back (nft -j: minutes)")
    args = ap.parse_args()
    print(f"{'backend':16} {'rules':>5} {'peers':>7} {'old s':>7} {'old cpu':>7} {'new s':>7} {'new cpu':>7} "
          f"{'again s':>7} {'again cpu':>9} {'same':>5} {'load':>5}", flush=True)
    for name in args.backends.split(","):
        ns = f"stk-brb-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        backend = None
        try:
            backend = _backend(name, ns)
            old_read: Callable[[], LoadedRuleset] | None = None
            if args.no_old:
                pass
            elif name.startswith("iptables"):
                old_read = partial(read_iptables_text, _variant(name), ns)
            elif name == "nftables":
                old_read = partial(read_nftables_json, "stkbench", ns)
            new_read = partial(read_loaded, name, netns=ns, table="stkbench")
            for n_rules in (int(x) for x in args.rules.split(",")):
                for n_peers in (int(x) for x in args.peers.split(",")):
                    hp = random_host_policy(random.Random(n_rules * 7 + n_peers), rules=n_rules, peers=n_peers,
                                            sets=max(4, n_rules // 4), identities=200)
                    backend.apply(backend.render(hp))  # type: ignore[arg-type]
                    load = os.getloadavg()[0]
                    old_s = old_c = "-"
                    old = None
                    if old_read is not None:
                        old, ow, oc = _timed(old_read)
                        old_s, old_c = f"{ow:.3f}", f"{oc:.2f}"
                    new, nw, nc = _timed(new_read)
                    again, aw, ac = _timed(new_read)
                    same = "-" if old is None or name == "nftables" else str(old == new == again)
                    print(f"{name:16} {n_rules:5} {n_peers:7} {old_s:>7} {old_c:>7} {nw:7.3f} {nc:7.2f} "
                          f"{aw:7.3f} {ac:9.2f} {same:>5} {load:5.1f}", flush=True)
        finally:
            if backend is not None:
                backend.remove()
            subprocess.run(["ip", "netns", "delete", ns], check=False)


if __name__ == "__main__":
    main()
