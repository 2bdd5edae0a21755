"""The eBPF read-back model without a kernel: trie entries -> the prover's IR.

The rendered trie of random policies is decoded as the kernel's longest-prefix match reads it
and proven equal to the policy; edited tries give differences; entries the datapath cannot
read as the model does are refused; program tags mask map references as the kernel does.
"""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from stockade.backends.ebpf.identity import L4, Verdict
from stockade.backends.ebpf.render import policy_key, policy_value, render_ebpf
from stockade.backends.wireguard import SOCKET_MARK
from stockade.compiler.ir import Direction, HostPolicy
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.verify.ebpf_readback import _lpm_ranges, datapath_rules, decode_trie, program_tags
from stockade.verify.loaded import LoadedRuleset, Steering
from stockade.verify.prove import Proof, prove
from stockade.verify.samples import random_host_policy


def _prove_trie(hp: HostPolicy, raw: dict[bytes, bytes]) -> Proof:
    peers, policy = decode_trie(raw)
    fams = tuple(datapath_rules(f, hp.mode, peers[f], policy) for f in (Family.V4, Family.V6))
    return prove(hp, LoadedRuleset("ebpf", True, fams, flow_states=True))


def _trie(hp: HostPolicy) -> dict[bytes, bytes]:
    keys, values = render_ebpf(hp).trie_items()
    return dict(zip(keys, values, strict=True))


def test_lpm_resolution_longest_prefix_wins() -> None:
    # 0-255 -> 1, inside it 16-31 -> 2, inside that 20-23 -> 3; 512-767 -> 4
    got = _lpm_ranges([(16, 31, 2), (0, 255, 1), (20, 23, 3), (512, 767, 4)], 1023, 0)
    assert got == [(0, 15, 1), (16, 19, 2), (20, 23, 3), (24, 31, 2), (32, 255, 1), (256, 511, 0),
                   (512, 767, 4), (768, 1023, 0)]  # fmt: skip
    assert _lpm_ranges([], 7, 9) == [(0, 7, 9)]


@pytest.mark.parametrize("seed", range(60))
def test_rendered_tries_are_proven_equal(seed: int) -> None:
    hp = random_host_policy(random.Random(1000 + seed))
    proof = _prove_trie(hp, _trie(hp))
    assert proof.proven, proof.summary()


def _first_allow(raw: dict[bytes, bytes]) -> bytes:
    for key, value in raw.items():
        if key[4] == 1 and struct.unpack("=II", value)[0] == Verdict.ALLOW.value:
            proto = struct.unpack_from(">IBBH", key, 5)[2]
            if proto == L4.TCP.value:
                return key
    raise AssertionError("no TCP allow entry")


def test_a_swapped_verdict_in_the_trie_is_a_difference() -> None:
    for seed in range(40):
        hp = random_host_policy(random.Random(seed))
        raw = _trie(hp)
        try:
            key = _first_allow(raw)
        except AssertionError:
            continue
        if hp.mode.value == "visibility":
            continue
        raw[key] = policy_value(Verdict.BLOCK, 0)
        proof = _prove_trie(hp, raw)
        assert not proof.proven
        d = proof.differences[0]
        assert d.policy_accepts and not d.kernel_accepts and d.packet.ct_state == "new"
        return
    pytest.fail("no policy with a TCP allow")


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        (struct.pack("=IB16s3x", 4, 1, b""), struct.pack("=II", 1, 0), "prefix length 4"),
        (struct.pack("=IB16s3x", 40, 9, b""), struct.pack("=II", 1, 0), "kind 9"),
        (struct.pack("=IB16s3x", 8 + 33, 4, b""), struct.pack("=II", 1, 0), "longer than an address"),
        (struct.pack("=IB16s3x", 8 + 40, 1, b""), struct.pack("=II", 1, 0), "policy entry of prefix length"),
        (policy_key(Direction.INBOUND, 1, L4.TCP, 80, 16), struct.pack("=II", 4, 0), "verdict 4"),
        (struct.pack("=IB16s3x", 72, 1, struct.pack(">IBBH", 1, 2, 6, 80)), struct.pack("=II", 1, 0), "direction 2"),
        (struct.pack("=IB16s3x", 72, 1, struct.pack(">IBBH", 1, 0, 47, 0)), struct.pack("=II", 1, 0), "protocol 47"),
    ],
)
def test_unreadable_entries_are_refused(key: bytes, value: bytes, what: str) -> None:
    with pytest.raises(UnmodelledConstructError, match=what):
        decode_trie({key: value})


def test_the_rendered_encrypted_golden_policy_is_proven_with_its_tunnel() -> None:
    from tests.golden.test_encrypt_golden import POLICY

    keys, values = render_ebpf(POLICY).trie_items()
    peers, policy = decode_trie(dict(zip(keys, values, strict=True)))  # allow-encrypted entries are read
    for steering, proven in ((Steering.TUNNEL, True), (Steering.CLEAR, False), (Steering.NONE, False)):
        fams = tuple(datapath_rules(f, POLICY.mode, peers[f], policy, tunnel=steering, wg_mark=SOCKET_MARK)
                     for f in (Family.V4, Family.V6))
        proof = prove(POLICY, LoadedRuleset("ebpf", True, fams, flow_states=True, steering=steering))
        assert proof.proven is proven, (steering, proof.summary())


def test_program_tag_masks_map_references_as_the_kernel_does() -> None:
    ld_map = bytes([0x18, 0x11, 0, 0]) + struct.pack("<i", 7) + bytes(4) + struct.pack("<i", 3)  # fd 7, high half 3
    exit_ = bytes([0x95]) + bytes(7)
    masked = bytes([0x18, 0x11, 0, 0]) + bytes(4) + bytes(8) + exit_
    assert program_tags(ld_map + exit_) == program_tags(masked)
    assert hashlib.sha256(masked).hexdigest()[:16] in program_tags(ld_map + exit_)
    other = bytes([0xB7, 0, 0, 0, 1, 0, 0, 0]) + exit_
    assert program_tags(other).isdisjoint(program_tags(masked))
