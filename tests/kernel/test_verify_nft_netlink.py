"""The netlink read-back of nftables (``verify.nft_netlink``) agrees with ``nft -j list table``.

The prover reads nftables over netlink (one dump per object kind and chain, no nft, no JSON:
see ``backends/nftables/dump.py`` for why). That reader is only trusted because it yields the
same model as the JSON listing nft itself prints, on the rulesets the renderer really loads:
random HostPolicies (both layouts, every mode, forward chains, flow logs, literal addresses)
are applied in one namespace and both read-backs are parsed into the IR and compared. The
comparison normalises only what is equal by construction of the proof's domain and says why
(see :func:`normalise`). The netlink reader also refuses what it does not model.
"""

from __future__ import annotations

import random
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from stockade.backends.nftables.backend import NftablesBackend
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.model.workloads import EnforcementMode
from stockade.verify.loaded import FamilyIs, Field, IntIn, Kind, LoadedRuleset, Match
from stockade.verify.readback import read_nftables, read_nftables_json
from stockade.verify.samples import random_host_policy

pytestmark = pytest.mark.kernel
TABLE = "stknl"
POLICIES = 60


def _matches(ms: tuple[Match, ...], verdict: Kind) -> tuple[Match, ...]:
    if verdict is Kind.CONTINUE:
        # a rule without a verdict decides nothing; nft -j prints ``add @flowlog {...}`` without
        # the nfproto/l4proto dependencies the kernel evaluates before it (netlink shows them)
        return ()
    ms = tuple(dict.fromkeys(ms))  # nft's implicit dependencies repeat matches (a conjunction)
    for family, icmp in ((Family.V4, 1), (Family.V6, 58)):
        # ``icmpv6 type`` in an inet table carries a ``meta nfproto ipv6`` dependency nft -j does
        # not print; the proof's domain already excludes ICMPv6 in IPv4 (and ICMP in IPv6)
        if IntIn(Field.L4PROTO, ((icmp, icmp),)) in ms:
            ms = tuple(m for m in ms if m != FamilyIs(family))
    return ms


def normalise(loaded: LoadedRuleset) -> object:
    out = []
    for f in loaded.families:
        chains = {
            name: (c.policy, tuple((_matches(r.matches, r.verdict.kind), r.verdict, r.comment) for r in c.rules))
            for name, c in f.chains.items()
        }
        maps = {name: sorted(elems, key=repr) for name, elems in f.maps.items()}
        out.append((f.family, chains, f.hooks, f.sets, maps, f.dynamic_sets))
    return (loaded.backend, loaded.present, out, loaded.notes)


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"stk-vnl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


def nft(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *args], check=True, capture_output=True)


def test_netlink_reader_agrees_with_nft_json(netns: str, record_property: Callable[[str, object], None]) -> None:
    rules = 0
    for seed in range(POLICIES):
        rng = random.Random(seed)
        layout = "lookup" if seed % 3 else "list"
        backend = NftablesBackend(TABLE, netns=netns, layout=layout, forward=seed % 4 == 0)
        hp = random_host_policy(
            rng, rules=rng.choice((1, 4, 8, 20)), peers=rng.choice((2, 6, 30)),
            mode=rng.choice(list(EnforcementMode)), identities=rng.choice((None, 3)),
        )  # fmt: skip
        backend.apply(backend.render(hp))
        fast, reference = read_nftables(TABLE, netns), read_nftables_json(TABLE, netns)
        assert normalise(fast) == normalise(reference), f"seed {seed} ({layout})"
        rules += sum(len(c.rules) for f in fast.families[:1] for c in f.chains.values())
    record_property("lab_summary", f"nft netlink reader == nft -j on {POLICIES} random rulesets ({rules} rules)")
    NftablesBackend(TABLE, netns=netns).remove()
    assert not read_nftables(TABLE, netns).present


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        (("meta", "mark", "0x1", "accept"), "mark"),
        (("ct", "mark", "0x1", "accept"), "ct mark"),
        (("iifname", "eth*", "accept"), "eth*"),
        (("limit", "rate", "10/second", "accept"), "limit"),
        (("ip", "saddr", "1.2.3.4", "meta", "mark", "set", "1"), "mark set"),
        (("ip", "dscp", "1", "accept"), "network header offset"),
    ],
)
def test_netlink_reader_refuses_what_it_does_not_model(netns: str, statement: tuple[str, ...], named: str) -> None:
    backend = NftablesBackend(TABLE, netns=netns)
    backend.apply(backend.render(random_host_policy(random.Random(1))))
    nft(netns, "insert", "rule", "inet", TABLE, "inbound", *statement)
    with pytest.raises(UnmodelledConstructError, match=named.replace("*", r"\*")):
        read_nftables(TABLE, netns)


def test_netlink_reader_refuses_objects_and_dormant_tables(netns: str) -> None:
    backend = NftablesBackend(TABLE, netns=netns)
    backend.apply(backend.render(random_host_policy(random.Random(2))))
    nft(netns, "add", "counter", "inet", TABLE, "extra")
    with pytest.raises(UnmodelledConstructError, match="object"):
        read_nftables(TABLE, netns)
    nft(netns, "delete", "counter", "inet", TABLE, "extra")
    read_nftables(TABLE, netns)
    nft(netns, "add", "table", "inet", TABLE, "{", "flags", "dormant", ";", "}")
    with pytest.raises(UnmodelledConstructError, match="dormant"):
        read_nftables(TABLE, netns)
