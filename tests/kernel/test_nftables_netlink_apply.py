"""A full table applied as one netlink batch (``NetlinkTableBackend``) means what ``nft -f`` means.

The pod path replays, from a template learnt once per shape, what ``nft -f`` loaded; these tests
hold it to the ``nft -f`` path in real namespaces:

* the same random HostPolicies (both layouts, forward chains, every mode) applied both ways, in
  two namespaces, read back over netlink: byte-identical tables (canonical dump) and the same
  prover model; a second policy of the same shape with other peer-set members goes through the
  cached template and again equals the ``nft -f`` table; the prover proves the netlink table;
* a batch the kernel refuses leaves the CNI's default-deny exactly as it was, and the backend then
  falls back to ``nft -f`` (never to anything wider);
* the read-back catches tampering (an extra peer, a deleted rule, a flushed chain) and the
  enforcer restores; a set delta on a netlink-applied table gives a baseline the next check agrees with.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from stockade.agent.enforcer import Enforcer
from stockade.backends.nfnetlink import attr, nest
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.dump import dump_table
from stockade.backends.nftables.netlink import NftNetlink
from stockade.backends.nftables.netlink_apply import NetlinkTableBackend, TemplateCache
from stockade.backends.nftables.render import NftablesArtifact
from stockade.backends.nftables.template import TableTemplate, canonical, shape_key, table_batch
from stockade.compiler.delta import diff_sets
from stockade.compiler.ir import HostPolicy
from stockade.errors import ApplyError
from stockade.k8s.cni import default_deny
from stockade.model.addresses import Family, IPNetwork
from stockade.model.workloads import EnforcementMode
from stockade.verify.prove import prove
from stockade.verify.readback import read_nftables
from stockade.verify.samples import random_host_policy

pytestmark = pytest.mark.kernel
TABLE = "stknla"
POLICIES = 30


def _ns() -> str:
    name = f"stk-nla-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


@pytest.fixture
def two_ns() -> Iterator[tuple[str, str]]:
    a, b = _ns(), _ns()
    try:
        yield a, b
    finally:
        for n in (a, b):
            subprocess.run(["ip", "netns", "delete", n], check=False, capture_output=True)


@pytest.fixture
def templates() -> Iterator[TemplateCache]:
    cache = TemplateCache()
    try:
        yield cache
    finally:
        cache.close()


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], input=stdin, check=True,
                          capture_output=True, text=True)
    return proc.stdout


def other_members(hp: HostPolicy, rng: random.Random) -> HostPolicy:
    """``hp`` with other peers in every set (same shape: only members differ)."""
    def members(family: Family) -> tuple[IPNetwork, ...]:
        out: set[IPNetwork] = set()
        for _ in range(rng.randint(0, 12)):
            if family is Family.V4:
                base = ipaddress.ip_network(f"10.{rng.randint(100, 199)}.{rng.randint(0, 255)}.0/24")
                out.add(base if rng.random() < 0.2 else ipaddress.ip_network(f"{base[rng.randint(1, 254)]}/32"))
            else:
                base = ipaddress.ip_network(f"fd{rng.randint(16, 99)}:{rng.randint(0, 65535):x}::/64")
                out.add(base if rng.random() < 0.2 else ipaddress.ip_network(f"{base[rng.randint(1, 9999)]}/128"))
        return tuple(sorted(out, key=lambda n: (int(n.network_address), n.prefixlen)))

    sets = tuple(dataclasses.replace(s, members=members(s.family)) for s in hp.sets)
    return dataclasses.replace(hp, workload=hp.workload + "-b", sets=sets)


def both_ways(a: str, b: str, hp: HostPolicy, templates: TemplateCache, layout: str, forward: bool) -> None:
    old = NftablesBackend(TABLE, netns=a, layout=layout, forward=forward)
    new = NetlinkTableBackend(TABLE, netns=b, layout=layout, forward=forward, templates=templates)
    try:
        Enforcer(old).enforce(hp)
        Enforcer(new).enforce(hp)  # apply + the netlink structural verify (raises if it differs)
        assert new.last_path == "netlink"
        want, got = dump_table(TABLE, a), dump_table(TABLE, b)
        assert want is not None and got is not None
        assert canonical(got) == canonical(want), hp.workload
        assert read_nftables(TABLE, b) == read_nftables(TABLE, a)
    finally:
        new.close()


def test_netlink_table_is_the_nft_table(two_ns: tuple[str, str], templates: TemplateCache) -> None:
    a, b = two_ns
    proofs = 0
    for seed in range(POLICIES):
        rng = random.Random(seed)
        layout = "lookup" if seed % 3 else "list"
        forward = seed % 4 == 0
        hp = random_host_policy(rng, rules=rng.randint(1, 10), peers=rng.randint(0, 12), sets=rng.randint(1, 4))
        both_ways(a, b, hp, templates, layout, forward)
        learnt = templates.learnt
        hp2 = other_members(hp, rng)
        artifact = NftablesBackend(TABLE, layout=layout, forward=forward).render(hp2)
        assert shape_key(artifact) == shape_key(NftablesBackend(TABLE, layout=layout, forward=forward).render(hp))
        both_ways(a, b, hp2, templates, layout, forward)
        assert templates.learnt == learnt, "the same shape must reuse its template"
        if seed % 5 == 0 and hp2.mode is not EnforcementMode.IDLE:
            proof = prove(hp2, read_nftables(TABLE, b))
            assert proof.proven, proof.summary()
            proofs += 1
    assert templates.learnt <= POLICIES and proofs >= 4


class _Broken(TemplateCache):
    """Hands out a template whose last rule jumps to a chain that does not exist."""

    def template_for(self, artifact: NftablesArtifact) -> TableTemplate:
        return _broken(super().template_for(artifact))


def _broken(t: TableTemplate) -> TableTemplate:
    """``t`` with one more rule, last in the batch, in a chain that does not exist (ENOENT)."""
    bad = attr(1, TABLE.encode() + b"\0") + attr(2, b"nowhere\0") + nest(4)
    return dataclasses.replace(t, rules=(*t.rules, bad))


def test_refused_batch_leaves_the_default_deny(two_ns: tuple[str, str]) -> None:
    a, _ = two_ns
    nft(a, "-f", "-", stdin=default_deny(TABLE))
    before = nft(a, "list", "table", "inet", TABLE)
    hp = random_host_policy(random.Random(7), rules=5, peers=6, sets=2, mode=EnforcementMode.FULL)
    cache = _Broken()
    try:
        artifact = NftablesBackend(TABLE).render(hp)
        template = cache.template_for(artifact)
        with NftNetlink(a) as channel, pytest.raises(ApplyError):
            channel.send_batch(table_batch(template, artifact), "table batch")
        assert nft(a, "list", "table", "inet", TABLE) == before  # nothing of the batch is in force
        # the backend falls back to nft -f with the same artifact: what nft -f alone would load
        backend = NetlinkTableBackend(TABLE, netns=a, templates=cache)
        try:
            Enforcer(backend).enforce(hp)
            assert backend.last_path == "nft"
            assert backend.verify(artifact).ok
            assert NftablesBackend(TABLE, netns=a).verify(artifact).ok
        finally:
            backend.close()
    finally:
        cache.close()


def test_read_back_catches_tamper_and_follows_deltas(two_ns: tuple[str, str], templates: TemplateCache) -> None:
    a, _ = two_ns
    hp = random_host_policy(random.Random(3), rules=6, peers=8, sets=3, mode=EnforcementMode.FULL)
    backend = NetlinkTableBackend(TABLE, netns=a, templates=templates)
    enforcer = Enforcer(backend)
    try:
        enforcer.enforce(hp)
        assert backend.last_path == "netlink"
        artifact = backend.render(hp)
        peer_set = next(s for s in artifact.sets if s.family is Family.V4 and s.name.endswith("_host"))
        tampers = [
            f"add element inet {TABLE} {peer_set.name} {{ 203.0.113.77 }}",
            f"flush chain inet {TABLE} inbound",
            f"insert rule inet {TABLE} input tcp dport 4444 accept",
        ]
        for cmd in tampers:
            assert enforcer.check() is None
            nft(a, "-f", "-", stdin=cmd + "\n")
            if "add element" in cmd:
                problems = backend.verify(artifact).problems
                assert any("unexpected 203.0.113.77" in p for p in problems), problems
            report = enforcer.check()
            assert report is not None and report.restored, (cmd, report)
            assert backend.last_path == "netlink"
            assert backend.verify(artifact).ok
        # a set delta on the netlink-applied table: its baseline is what the next check reads
        s = hp.sets[0]
        extra = ipaddress.ip_network("198.51.100.9/32" if s.family is Family.V4 else "fd99::9/128")
        hp2 = dataclasses.replace(hp, sets=(dataclasses.replace(s, members=(*s.members, extra)), *hp.sets[1:]))
        enforcer.apply_delta(hp2, diff_sets(hp.sets, hp2.sets))
        assert enforcer.check() is None
        assert backend.verify(backend.render(hp2)).ok
    finally:
        backend.close()
