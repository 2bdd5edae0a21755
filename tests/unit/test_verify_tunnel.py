"""Encrypted rules in the proof, without a kernel: the tunnel dimension of the header space.

Random HostPolicies with encrypted allows are rendered to the eBPF trie (and to iptables text, read
as ``iptables-save`` prints it, the mangle table's steering included), read back as the datapath
reads it and proven equal to the policy, with the tunnel named in ``stk_current`` (the redirect
goes into the WireGuard interface). Every mutant of the tunnel gives a counterexample that says
which outcome differs: an ``allow-encrypted`` entry made plain ``allow`` (inbound: accepted in the
clear), the interface index pointing at an Ethernet interface (outbound: sent in the clear) or at
nothing (dropped), wireguard-go's fwmark pass removed (its packets dropped). Constructs the model
does not cover are refused.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from pathlib import Path

import pytest

from stockade.backends.ebpf.identity import Verdict
from stockade.backends.ebpf.render import render_ebpf
from stockade.backends.iptables.render import render_iptables
from stockade.backends.wireguard import SOCKET_MARK
from stockade.compiler.ir import Direction, HostPolicy
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.verify.ebpf_readback import datapath_rules, decode_trie
from stockade.verify.interpret import Interpreter
from stockade.verify.ipt_readback import parse_iptables
from stockade.verify.loaded import (
    Chain,
    FamilyRules,
    HookName,
    Kind,
    LoadedRuleset,
    PacketMark,
    Rule,
    Steering,
    Tunnel,
)
from stockade.verify.loaded import Verdict as RuleVerdict
from stockade.verify.offline import iptables_save_texts, prove_iptables_artifact
from stockade.verify.prove import Proof, prove
from stockade.verify.samples import random_host_policy
from stockade.verify.space import HeaderSpace
from stockade.verify.tunnel import match_bdd


def _encrypted(seed: int) -> HostPolicy:
    rng = random.Random(7000 + seed)
    while True:
        hp = random_host_policy(rng, encrypted=0.6)
        if any(r.encrypt for r in hp.rules):
            return hp


def _trie(hp: HostPolicy) -> dict[bytes, bytes]:
    keys, values = render_ebpf(hp).trie_items()
    return dict(zip(keys, values, strict=True))


def _prove(hp: HostPolicy, raw: dict[bytes, bytes], steering: Steering = Steering.TUNNEL,
           wg_mark: int = SOCKET_MARK) -> Proof:
    peers, policy = decode_trie(raw)
    fams = tuple(datapath_rules(f, hp.mode, peers[f], policy, tunnel=steering, wg_mark=wg_mark)
                 for f in (Family.V4, Family.V6))
    return prove(hp, LoadedRuleset("ebpf", True, fams, flow_states=True, steering=steering))


@pytest.mark.parametrize("seed", range(40))
def test_encrypted_policies_are_proven_on_the_ebpf_model(seed: int) -> None:
    hp = _encrypted(seed)
    proof = _prove(hp, _trie(hp))
    assert proof.proven, proof.summary()


def _plain(raw: dict[bytes, bytes], direction: int) -> dict[bytes, bytes]:
    """Every allow-encrypted entry of one direction made a plain allow."""
    out = dict(raw)
    for key, value in raw.items():
        verdict, rule = struct.unpack("=II", value)
        if key[4] == 1 and key[9] == direction and verdict == Verdict.ALLOW_ENCRYPTED.value:
            out[key] = struct.pack("=II", Verdict.ALLOW.value, rule)
    return out


def _with_encrypted(direction: Direction) -> HostPolicy:
    """A policy whose trie holds allow-encrypted entries of ``direction`` (a peer set not empty)."""
    for seed in range(200):
        hp = _encrypted(seed)
        raw = _trie(hp)
        if _plain(raw, 0 if direction is Direction.INBOUND else 1) != raw:
            return hp
    raise AssertionError("no policy with such an encrypted rule")


def test_encrypted_inbound_made_plain_is_accepted_in_the_clear() -> None:
    hp = _with_encrypted(Direction.INBOUND)
    proof = _prove(hp, _plain(_trie(hp), 0))
    assert not proof.proven
    d = proof.differences[0]
    assert d.packet.direction is Direction.INBOUND and not d.packet.tunnel  # arrived in the clear
    assert (d.policy_accepts, d.kernel_accepts) == (False, True)


def test_encrypted_outbound_made_plain_is_sent_in_the_clear() -> None:
    hp = _with_encrypted(Direction.OUTBOUND)
    proof = _prove(hp, _plain(_trie(hp), 1))
    assert not proof.proven
    d = next(d for d in proof.differences if d.packet.direction is Direction.OUTBOUND)
    assert not d.packet.tunnel and (d.policy_accepts, d.kernel_accepts) == (False, True)  # the clear: leaked
    assert str(d).startswith("outbound")


def test_tunnel_index_on_an_ethernet_interface_or_none_is_caught() -> None:
    hp = _with_encrypted(Direction.OUTBOUND)
    raw = _trie(hp)
    clear = _prove(hp, raw, Steering.CLEAR)
    assert not clear.proven
    out = [d for d in clear.differences if d.packet.direction is Direction.OUTBOUND]
    assert out and not out[0].packet.tunnel and (out[0].policy_accepts, out[0].kernel_accepts) == (False, True)
    none = _prove(hp, raw, Steering.NONE)
    out = [d for d in none.differences if d.packet.direction is Direction.OUTBOUND]
    assert out and out[0].packet.tunnel and (out[0].policy_accepts, out[0].kernel_accepts) == (True, False)


def test_wireguard_go_fwmark_pass_removed_is_caught() -> None:
    hp = _encrypted(0)
    proof = _prove(hp, _trie(hp), wg_mark=0)
    out = [d for d in proof.differences if d.packet.direction is Direction.OUTBOUND]
    assert out and out[0].packet.socket_mark and (out[0].policy_accepts, out[0].kernel_accepts) == (True, False)
    assert "wireguard-go's fwmark" in str(out[0])


def test_a_host_without_encrypted_rules_is_unchanged_by_the_tunnel_bits() -> None:
    hp = random_host_policy(random.Random(5))
    assert hp.wireguard is None
    proof = _prove(hp, _trie(hp), steering=Steering.NONE, wg_mark=0)
    assert proof.proven, proof.summary()


def test_unmodelled_tunnel_constructs_are_refused() -> None:
    space = HeaderSpace()
    with pytest.raises(UnmodelledConstructError, match="packet mark 0x1234"):
        match_bdd(space, PacketMark(0x1234), HookName.OUTPUT)
    # a steering mark set at the input hook has no meaning there
    chain = Chain("input", (Rule((Tunnel(HookName.INPUT),), RuleVerdict(Kind.MARK)),), Kind.ACCEPT)
    rules = FamilyRules(Family.V4, {"input": chain}, {HookName.INPUT: ("input",)}, {})
    with pytest.raises(UnmodelledConstructError, match="steering mark set at the input hook"):
        Interpreter(space, rules, HookName.INPUT, {}, None).hook_accept(frozenset())
    # a mark test that depends on the marks the rules set (no fixed point)
    flip = Chain("output", (Rule((PacketMark(0x5745, negate=True),), RuleVerdict(Kind.MARK)),), Kind.ACCEPT)
    rules = FamilyRules(Family.V4, {"output": flip}, {HookName.OUTPUT: ("output",)}, {})
    with pytest.raises(UnmodelledConstructError, match="depends on the marks"):
        Interpreter(space, rules, HookName.OUTPUT, {}, None).hook_accept(frozenset())


# ---- iptables: rendered artifacts, read as iptables-save would print them -----------------------

WG = "wgstk0"


@pytest.mark.parametrize("seed", range(40))
def test_encrypted_policies_are_proven_on_the_iptables_artifact(seed: int) -> None:
    hp = _encrypted(seed)
    proof = prove_iptables_artifact(hp, render_iptables(hp, wg_interface=WG), WG)
    assert proof.proven, proof.summary()


def _save_mutant(hp: HostPolicy, *drop: str) -> Proof:
    """The artifact's saves with the first line containing all of ``drop`` removed, proven."""
    v4, v6, ipsets = iptables_save_texts(render_iptables(hp, wg_interface=WG))
    lines = v4.splitlines()
    i = next(i for i, line in enumerate(lines) if all(x in line for x in drop))
    v4 = "\n".join(lines[:i] + lines[i + 1:]) + "\n"
    return prove(hp, parse_iptables(v4, v6, ipsets, wg_interface=WG))


def test_iptables_steering_removed_and_clear_text_drop_removed_are_caught() -> None:
    out = _with_encrypted(Direction.OUTBOUND)
    # the steering of an encrypted rule's first packets: dropped by the filter's guard
    d = next(d for d in _save_mutant(out, "dst -j MARK --set-xmark").differences
             if d.packet.direction is Direction.OUTBOUND)
    assert d.packet.tunnel and (d.policy_accepts, d.kernel_accepts) == (True, False)
    # the steering of an encrypted connection's packets: they would leave in the clear
    d = next(d for d in _save_mutant(out, "-m connmark --mark 0x5745 -j MARK").differences
             if d.packet.direction is Direction.OUTBOUND)
    assert d.packet.encrypted_connection and not d.packet.tunnel
    assert (d.policy_accepts, d.kernel_accepts) == (False, True)
    d = _save_mutant(out, f"! -o {WG} -m mark").differences[0]  # the mangle POSTROUTING guard
    assert not d.packet.route_ok and (d.policy_accepts, d.kernel_accepts) == (False, True)
    d = _save_mutant(out, f"! -i {WG} -m connmark").differences[0]  # the input guard
    assert d.packet.direction is Direction.INBOUND and d.packet.encrypted_connection and not d.packet.tunnel
    assert (d.policy_accepts, d.kernel_accepts) == (False, True)
    inb = _with_encrypted(Direction.INBOUND)
    # the encrypted inbound rule's clear-text drop: plaintext accepted
    d = next(d for d in _save_mutant(inb, f"! -i {WG} -p", "-j DROP").differences
             if d.packet.direction is Direction.INBOUND)
    assert not d.packet.tunnel and (d.policy_accepts, d.kernel_accepts) == (False, True)
    # equivalent: its flow-log line (no verdict) removed
    assert _save_mutant(inb, f"! -i {WG} -p", "-j NFLOG").proven


def test_iptables_tunnel_options_without_a_known_interface_are_refused() -> None:
    hp = _encrypted(1)
    with pytest.raises(UnmodelledConstructError, match=f"interface '{WG}'"):
        prove_iptables_artifact(hp, render_iptables(hp, wg_interface=WG))
    v4, v6, ipsets = iptables_save_texts(render_iptables(hp, wg_interface=WG))
    with pytest.raises(UnmodelledConstructError, match="mark"):
        parse_iptables(v4.replace("0x5745/0xffffffff", "0x5745/0xff", 1), v6, ipsets, wg_interface=WG)


def test_regression_an_encrypted_rule_outside_the_port_maps_renders_one_comment_per_line() -> None:
    """nftables refused the whole ruleset ("unexpected comment") when an encrypted rule had a service
    the port maps do not carry (ICMP, any): its clear-text drop line had the rule's comment twice."""
    from stockade.backends.nftables.render import render_nftables

    hp = next(h for h in (_encrypted(s) for s in range(200))
              if any(r.encrypt and any(e.proto.value in ("icmp", "icmpv6", "any") for e in r.services)
                     for r in h.rules))
    text = render_nftables(hp, wg_interface=WG).to_text()
    assert not [line for line in text.splitlines() if line.count(" comment ") > 1]


def test_cli_wg_interface_is_validated_naming_the_option(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stockade.cli import main
    from stockade.compiler.ir import host_policy_to_json

    path = tmp_path / "hp.json"
    path.write_text(host_policy_to_json(_encrypted(0)))
    result = CliRunner().invoke(main, ["verify", "--host-policy", str(path), "--wg-interface", "wg0; rm -rf /"])
    assert result.exit_code != 0 and "--wg-interface" in result.output


def _in_own_peer_set() -> HostPolicy:
    """A web host whose one rule is ``app=web -> app=web`` tcp/5432 encrypted: an encrypted
    outbound allow whose peer set holds the host's own address."""
    for seed in range(200):
        hp = _encrypted(seed)
        for r in hp.rules:
            if not (r.encrypt and r.action is Action.ALLOW and r.direction is Direction.OUTBOUND):
                continue
            for s in hp.sets:
                if s.name == r.peer and s.family is Family.V4 and s.members and s.members[0].num_addresses > 2:
                    rule = dataclasses.replace(r, services=(ServiceEntry(Proto.TCP, 5432, 5432),))
                    own = s.members[0][1]  # a host address of the set
                    v6 = [a for a in hp.local_addresses if a.version == 6]
                    return dataclasses.replace(hp, rules=(rule,), local_addresses=(own, *v6))
    raise AssertionError("no policy with an encrypted outbound allow")


def test_regression_a_host_in_its_own_encrypted_peer_set_reaches_itself_on_lo() -> None:
    """The steering marked the host's connection to its own address (routed to lo) and the mangle
    POSTROUTING guard dropped it (found by the proof, confirmed in tests/kernel/test_wireguard_loopback):
    the steering now skips ``-o lo``; the old text (without the skip) is a counterexample on lo."""
    hp = _in_own_peer_set()
    assert prove_iptables_artifact(hp, render_iptables(hp, wg_interface=WG), WG).proven
    old = _save_mutant(hp, "-o lo -j RETURN")
    found = [d for d in old.differences if d.packet.direction is Direction.OUTBOUND and d.packet.loopback]
    assert found, old.summary()
    assert (found[0].policy_accepts, found[0].kernel_accepts) == (True, False), str(found[0])
