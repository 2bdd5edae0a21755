"""The fast iptables read-back (ipsets over netlink, rule lines parsed per part, kept between proofs)
against the text read-back (``ipset save`` and every line parsed whole), on real kernels.

* Differential: random policies applied by the backend (legacy and nft variants) read back equal
  both ways, and are proven.
* Strictness: a set holding what the model lacks (a ``nomatch`` member, a timeout, counters),
  swapped or added into a set a rule uses, makes the read-back refuse, as the text read-back does.
* Kept between proofs: an unchanged namespace read twice gives the same objects; a member added or a
  rule inserted, replaced in place or two sets swapped is seen by the next read (nothing stale is
  kept). The same for the nftables read-back, kept while the nf_tables generation is unchanged.
"""

from __future__ import annotations

import random
import shlex
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.iptables.model import IptablesVariant
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.verify.prove import prove
from stockade.verify.readback import read_iptables, read_iptables_text
from stockade.verify.samples import random_host_policy

pytestmark = pytest.mark.kernel

VARIANTS = [IptablesVariant.LEGACY, IptablesVariant.NFT]


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"stk-vfr-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        for tool in ("iptables-legacy", "ip6tables-legacy"):  # legacy tables die with the namespace; sets too
            subprocess.run(["nsenter", f"--net=/run/netns/{ns}", tool, "-F"], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


def run(ns: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], check=True, capture_output=True,
                          text=True).stdout


def _used_set(ns: str, variant: IptablesVariant) -> str:
    save = run(ns, "iptables-legacy-save" if variant is IptablesVariant.LEGACY else "iptables-nft-save")
    return next(line for line in save.splitlines() if "--match-set" in line).split("--match-set ")[1].split()[0]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_fast_read_back_equals_the_text_read_back(variant: IptablesVariant, netns: str) -> None:
    backend = IptablesBackend(netns=netns, variant=variant)
    for seed in range(12):
        rng = random.Random(seed)
        hp = random_host_policy(rng, rules=rng.choice((5, 20, 60)), peers=rng.choice((4, 50, 400)),
                                identities=20 if seed % 3 == 0 else None)
        backend.apply(backend.render(hp))
        fast = read_iptables(variant, netns)
        assert fast == read_iptables_text(variant, netns), seed
        assert any(f.sets for f in fast.families)
        assert prove(hp, fast).proven, seed


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
@pytest.mark.parametrize("inject", ["nomatch", "timeout", "counters"])
def test_a_set_the_model_lacks_is_refused(variant: IptablesVariant, inject: str, netns: str) -> None:
    backend = IptablesBackend(netns=netns, variant=variant)
    backend.apply(backend.render(random_host_policy(random.Random(11))))
    used = _used_set(netns, variant)
    family = "inet6" if used.endswith("v6") else "inet"
    member = "fd99::/64" if family == "inet6" else "10.99.0.0/16"
    if inject == "nomatch":
        run(netns, "ipset", "add", used, member, "nomatch")
    else:  # a set of the same type and family with a timeout / counters, swapped in under the rule
        tmp = f"stk-tmp-{uuid.uuid4().hex[:6]}"
        run(netns, "ipset", "create", tmp, "hash:net", "family", family, *(
            ("timeout", "600") if inject == "timeout" else ("counters",)))
        run(netns, "ipset", "add", tmp, member)
        run(netns, "ipset", "swap", used, tmp)
    with pytest.raises(UnmodelledConstructError, match=used):
        read_iptables(variant, netns)
    with pytest.raises(UnmodelledConstructError, match=used):  # the text read-back refuses it too
        read_iptables_text(variant, netns)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_what_is_kept_between_proofs_is_never_stale(variant: IptablesVariant, netns: str) -> None:
    backend = IptablesBackend(netns=netns, variant=variant)
    hp = random_host_policy(random.Random(4), rules=20, peers=50)
    backend.apply(backend.render(hp))
    first = read_iptables(variant, netns)
    again = read_iptables(variant, netns)
    assert again is first  # nothing changed: the same parse, the same set objects
    used = _used_set(netns, variant)
    v6 = used.endswith("v6")
    member, value = ("fd99::7", 0xFD99 << 112 | 7) if v6 else ("10.99.0.7", 0x0A630007)
    run(netns, "ipset", "add", used, member)
    added = read_iptables(variant, netns)
    fam = added.family(Family.V6 if v6 else Family.V4)
    assert fam is not None
    assert any(lo <= value <= hi for lo, hi in fam.sets[used].ranges)
    assert added == read_iptables_text(variant, netns)
    run(netns, "ipset", "del", used, member)
    assert read_iptables(variant, netns) == first
    tool = "iptables-legacy" if variant is IptablesVariant.LEGACY else "iptables-nft"
    run(netns, tool, "-I", "INPUT", "1", "-p", "tcp", "--dport", "4242", "-j", "DROP")
    inserted = read_iptables(variant, netns)
    v4 = inserted.family(Family.V4)
    assert v4 is not None and len(v4.chains["INPUT"].rules) == len(first.families[0].chains["INPUT"].rules) + 1
    assert not prove(hp, inserted).proven


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_a_rule_replaced_in_place_is_seen_and_traffic_is_not_a_change(variant: IptablesVariant, netns: str) -> None:
    """The rules' token is exact: a rule replaced by one of the same size (the same number of rules,
    the same blob size: x_tables' table info alone cannot tell) is read again; packets counted by
    the rules change nothing."""
    backend = IptablesBackend(netns=netns, variant=variant)
    backend.apply(backend.render(random_host_policy(random.Random(6), rules=10, peers=20)))
    first = read_iptables(variant, netns)
    run(netns, "ip", "link", "set", "lo", "up")
    run(netns, "ping", "-c", "2", "-i", "0.2", "-W", "1", "127.0.0.1")  # counters move
    assert read_iptables(variant, netns) is first
    tool = "iptables-legacy" if variant is IptablesVariant.LEGACY else "iptables-nft"
    save = run(netns, f"{tool}-save")
    rule = next(line for line in save.splitlines() if line.startswith("-A STOCKADE-IN ") and "2222" in line)
    argv = shlex.split(rule.replace("2222", "2223"))
    run(netns, tool, "-R", argv[1], "1", *argv[2:])
    assert "2223" in run(netns, f"{tool}-save")
    replaced = read_iptables(variant, netns)
    assert replaced != first
    assert replaced == read_iptables_text(variant, netns)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.value)
def test_two_sets_swapped_under_their_rules_are_seen(variant: IptablesVariant, netns: str) -> None:
    """``ipset swap`` exchanges two sets' members under unchanged rules (rules hold set indexes): the
    rules' token does not move, the sets' bytes do, and the next read-back shows the swap."""
    backend = IptablesBackend(netns=netns, variant=variant)
    backend.apply(backend.render(random_host_policy(random.Random(8), rules=20, peers=60)))
    first = read_iptables(variant, netns)
    v4 = first.family(Family.V4)
    assert v4 is not None
    used = sorted({n for n in v4.sets if not n.startswith("literal:")})
    a, b = next((x, y) for x in used for y in used if x < y and v4.sets[x].ranges != v4.sets[y].ranges)
    run(netns, "ipset", "swap", a, b)
    swapped = read_iptables(variant, netns)
    fam = swapped.family(Family.V4)
    assert fam is not None and fam.sets[a].ranges == v4.sets[b].ranges
    assert swapped == read_iptables_text(variant, netns)


# ---- nftables: the last read-back kept while the nf_tables generation is unchanged ---------------


def test_nftables_read_back_is_kept_while_nothing_is_committed(netns: str) -> None:
    from stockade.backends.nftables.backend import NftablesBackend
    from stockade.backends.nftables.dump import dump_table
    from stockade.verify.nft_netlink import parse_nft_dump
    from stockade.verify.readback import read_nftables

    backend = NftablesBackend("stkkept", netns=netns)
    hp = random_host_policy(random.Random(9), rules=20, peers=40)
    backend.apply(backend.render(hp))
    first = read_nftables("stkkept", netns)
    run(netns, "ip", "link", "set", "lo", "up")
    run(netns, "ping", "-c", "2", "-i", "0.2", "-W", "1", "127.0.0.1")  # counters and flow sets move
    assert read_nftables("stkkept", netns) is first
    v4 = first.family(Family.V4)
    assert v4 is not None
    name = next(n for n, s in v4.sets.items() if s.ranges)
    run(netns, "nft", "add", "element", "inet", "stkkept", name, "{ 10.99.0.7 }")  # one commit
    added = read_nftables("stkkept", netns)
    fam = added.family(Family.V4)
    assert fam is not None and any(lo <= 0x0A630007 <= hi for lo, hi in fam.sets[name].ranges)
    assert added == parse_nft_dump(dump_table("stkkept", netns), "stkkept", None)  # a fresh read, nothing kept
    assert not prove(hp, added).proven


def test_a_namespace_made_again_under_the_same_name_is_not_the_old_one() -> None:
    """The nf_tables generation id starts over in a new namespace: what was kept for a deleted
    namespace of the same name must not be taken for the new one's."""
    from stockade.backends.nftables.backend import NftablesBackend
    from stockade.verify.readback import read_nftables

    ns = f"stk-vfr-{uuid.uuid4().hex[:8]}"
    firsts = []
    try:
        for seed in (1, 2):  # same name, same number of commits, different policies
            subprocess.run(["ip", "netns", "add", ns], check=True)
            backend = NftablesBackend("stkkept", netns=ns)
            backend.apply(backend.render(random_host_policy(random.Random(seed), rules=10, peers=10)))
            firsts.append(read_nftables("stkkept", ns))
            subprocess.run(["ip", "netns", "delete", ns], check=True)
        assert firsts[0] is not firsts[1] and firsts[0] != firsts[1]
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
