"""The prover against the eBPF backend's LOADED programs and maps, in real namespaces.

* 200 seeded random HostPolicies are applied, one after the other, in ONE namespace (a veth
  to attach to), read back (programs by tag, the trie in force) and proven equal.
* Mutation testing (server and client namespaces joined by a veth): the policy is applied,
  then one mutation is written straight into the loaded maps with the bpf syscall (a peer
  element removed / added, a policy entry removed / added, a changed port, a swapped verdict,
  the mode switched). Each must yield a counterexample packet, and sending it for real (a TCP
  connect: an answer means accepted, a timeout dropped) must show the kernel's verdict.
  Equivalent mutants (an entry that resolves to what a miss gives, an overlapping shorter
  prefix that the longest-prefix match hides) must be proven equal.
* What the model does not cover is refused: a program whose tag is not Stockade's, an
  interface without our program, an entry the datapath cannot read as the model does.
"""

from __future__ import annotations

import ipaddress
import random
import struct
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade.backends.ebpf import syscall as bpf
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.ebpf.identity import L4, Verdict
from stockade.backends.ebpf.loader import Current
from stockade.backends.ebpf.render import peer_key, peer_value, policy_key, policy_value
from stockade.compiler.ir import Direction, HostPolicy
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.model.workloads import EnforcementMode
from stockade.verify.readback import prove_loaded
from stockade.verify.samples import random_host_policy

from .test_verify_kernel import CLI4, HINTS, SRV4, Pair, base_policy, ip, send, sh

pytestmark = pytest.mark.kernel

POLICIES = 200
CLI4B = "10.78.0.3"  # a second client address, in no set
HINTS_B = (*HINTS, ipaddress.ip_address(CLI4B))


def _table() -> str:
    return f"stkv{uuid.uuid4().hex[:6]}"


def test_random_policies_are_proven_equal_on_ebpf(record_property: Callable[[str, object], None]) -> None:
    ns = f"stk-vre-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", ns)
    table = _table()
    backend = EbpfBackend(netns=ns, table=table)
    try:
        ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ip("-n", ns, "link", "set", "eth0", "up")
        classes = 0
        for seed in range(POLICIES):
            hp = random_host_policy(random.Random(seed))
            backend.apply(backend.render(hp))
            proof = prove_loaded(hp, "ebpf", netns=ns, table=table)
            assert proof.proven, f"seed {seed}: {proof.summary()}"
            classes += proof.classes
    finally:
        backend.remove()
        backend.close()
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
    record_property("lab_summary", f"verify ebpf: {POLICIES} random policies proven ({classes} classes)")


# ---- mutations written into the loaded maps ----------------------------------------------------


class Maps:
    """The maps in force of one eBPF backend, for writing mutations."""

    def __init__(self, backend: EbpfBackend) -> None:
        self.backend = backend
        cur = backend.loader.current()
        assert cur is not None
        self.cur = cur
        trie = backend.loader.trie(cur.generation)
        assert trie is not None
        self.trie = trie

    def identity(self, address: str) -> int:
        raw = self.trie.lookup(peer_key(Family.V4, int(ipaddress.ip_address(address)), 32))
        assert raw is not None, address
        return int(struct.unpack("=II", raw)[0])

    def policy(self, direction: Direction, address: str, port: int, bits: int = 16) -> bytes:
        return policy_key(direction, self.identity(address), L4.TCP, port, bits)

    def close(self) -> None:
        self.trie.close()


def remove_peer(m: Maps) -> None:
    assert m.trie.delete(peer_key(Family.V4, int(ipaddress.ip_address(CLI4)), 32))


def add_peer(m: Maps) -> None:
    m.trie.update(peer_key(Family.V4, int(ipaddress.ip_address(CLI4B)), 32), peer_value(m.identity(CLI4)))


def remove_rule(m: Maps) -> None:
    assert m.trie.delete(m.policy(Direction.OUTBOUND, CLI4, 80))


def add_rule(m: Maps) -> None:
    m.trie.update(m.policy(Direction.INBOUND, CLI4, 443), policy_value(Verdict.ALLOW, 1))


def change_port(m: Maps) -> None:
    key = m.policy(Direction.INBOUND, CLI4, 80)
    value = m.trie.lookup(key)
    assert value is not None and m.trie.delete(key)
    m.trie.update(m.policy(Direction.INBOUND, CLI4, 8080), value)


def swap_verdict(m: Maps) -> None:
    key = m.policy(Direction.INBOUND, CLI4, 80)
    value = m.trie.lookup(key)
    assert value is not None
    rule = struct.unpack("=II", value)[1]
    m.trie.update(key, policy_value(Verdict.BLOCK, rule))


def switch_mode(m: Maps) -> None:
    m.backend.loader.set_current(Current(m.cur.serial, m.cur.epoch, EnforcementMode.SELECTIVE, m.cur.layout,
                                         m.cur.object))  # fmt: skip


def equiv_peer_in_no_set(m: Maps) -> None:  # identity 0 is what a miss gives
    m.trie.update(peer_key(Family.V4, int(ipaddress.ip_address("10.78.0.77")), 32), peer_value(0))


def equiv_shadowed_prefix(m: Maps) -> None:  # 80-81 blocked, but port 80's longer entry still allows
    m.trie.update(m.policy(Direction.INBOUND, CLI4, 80, 15), policy_value(Verdict.BLOCK, 1))


SEMANTIC: dict[str, Callable[[Maps], None]] = {
    "peer element removed": remove_peer,
    "peer element added": add_peer,
    "rule entry removed": remove_rule,
    "rule entry added": add_rule,
    "changed port": change_port,
    "swapped allow/block": swap_verdict,
    "mode switched": switch_mode,
}
EQUIVALENT: dict[str, Callable[[Maps], None]] = {
    "peer entry with the no-set identity": equiv_peer_in_no_set,
    "shorter prefix shadowed by a longer one": equiv_shadowed_prefix,
}


@pytest.fixture(scope="module")
def ebpf_pair() -> Iterator[Pair]:
    tag = uuid.uuid4().hex[:8]
    p = Pair(f"stk-ves-{tag}", f"stk-vec-{tag}")
    try:
        for ns in (p.srv, p.cli):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", p.srv, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", p.cli)
        for ns, a4, a6 in ((p.srv, SRV4, "fd78::1"), (p.cli, CLI4, "fd78::2")):
            ip("-n", ns, "addr", "add", f"{a4}/24", "dev", "eth0")
            ip("-n", ns, "addr", "add", f"{a6}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", p.cli, "addr", "add", f"{CLI4B}/24", "dev", "eth0")
        yield p
    finally:
        for ns in (p.srv, p.cli):
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


@pytest.fixture
def srv_backend(ebpf_pair: Pair) -> Iterator[tuple[EbpfBackend, str]]:
    table = _table()
    backend = EbpfBackend(netns=ebpf_pair.srv, table=table)
    try:
        yield backend, table
    finally:
        backend.remove()
        backend.close()


def test_ebpf_mutants_yield_counterexamples_the_probe_confirms(
    ebpf_pair: Pair, srv_backend: tuple[EbpfBackend, str], record_property: Callable[[str, object], None]
) -> None:
    backend, table = srv_backend
    hp = base_policy()
    found = confirmed = 0
    for name, mutate in SEMANTIC.items():
        backend.apply(backend.render(hp))
        assert prove_loaded(hp, "ebpf", netns=ebpf_pair.srv, table=table).proven
        maps = Maps(backend)
        try:
            mutate(maps)
        finally:
            maps.close()
        proof = prove_loaded(hp, "ebpf", netns=ebpf_pair.srv, table=table, hints=HINTS_B)
        assert not proof.proven, f"{name}: mutant not found"
        found += 1
        diff = proof.differences[0]
        assert diff.packet.src in HINTS_B or diff.packet.dst in HINTS_B, diff
        assert send(ebpf_pair, proof) is diff.kernel_accepts, f"{name}: probe disagrees with {diff}"
        confirmed += 1
    for name, mutate in EQUIVALENT.items():
        backend.apply(backend.render(hp))
        maps = Maps(backend)
        try:
            mutate(maps)
        finally:
            maps.close()
        proof = prove_loaded(hp, "ebpf", netns=ebpf_pair.srv, table=table, hints=HINTS_B)
        assert proof.proven, f"equivalent mutant {name}: {proof.summary()}"
    record_property(
        "lab_summary",
        f"verify mutants ebpf: score {found}/{len(SEMANTIC)} semantic found, {confirmed} confirmed by probe; "
        f"{len(EQUIVALENT)} equivalent mutants proven equivalent",
    )


# ---- what the model does not cover is refused ----------------------------------------------------

RETURN_OK = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0 (TC_ACT_OK); exit


def test_foreign_program_missing_program_and_unknown_entry_are_refused(
    ebpf_pair: Pair, srv_backend: tuple[EbpfBackend, str]
) -> None:
    backend, table = srv_backend
    hp: HostPolicy = base_policy()
    backend.apply(backend.render(hp))
    ns = ebpf_pair.srv
    pin = Path(f"/sys/fs/bpf/{table}-foreign")
    fd, _ = bpf.load_program(bpf.ProgType.SCHED_CLS, RETURN_OK, "GPL", "foreign")
    try:
        bpf.pin(fd, str(pin))
    finally:
        bpf.close_fd(fd)
    try:
        pref = str(backend.loader.pref)
        subprocess.run(  # nsenter, not ip netns exec: that remounts /sys, and the pin lives in bpffs
            ["nsenter", f"--net=/run/netns/{ns}", "tc", "filter", "replace", "dev", "eth0", "ingress", "pref", pref,
             "handle", "1", "bpf", "da", "object-pinned", str(pin)], check=True, capture_output=True,
        )  # fmt: skip
        with pytest.raises(UnmodelledConstructError, match="tag"):
            prove_loaded(hp, "ebpf", netns=ns, table=table)
        sh(ns, "tc", "filter", "del", "dev", "eth0", "ingress", "pref", pref, "handle", "1", "bpf")
        with pytest.raises(UnmodelledConstructError, match="no Stockade program"):
            prove_loaded(hp, "ebpf", netns=ns, table=table)
    finally:
        pin.unlink(missing_ok=True)
    backend.apply(backend.render(hp))
    assert prove_loaded(hp, "ebpf", netns=ns, table=table).proven
    maps = Maps(backend)
    try:
        maps.trie.update(maps.policy(Direction.INBOUND, CLI4, 80), struct.pack("=II", 7, 0))
    finally:
        maps.close()
    with pytest.raises(UnmodelledConstructError, match="verdict"):
        prove_loaded(hp, "ebpf", netns=ns, table=table)
