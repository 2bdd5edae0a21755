"""A host in its own encrypted rule's peer set reaches itself: the steering leaves ``lo`` alone.

Found by the proof of encrypted rules (docs/verification.md): with an encrypted rule
``app=web -> app=web`` on tcp/5432, nftables' ``steer`` chain and iptables' mangle ``STEER`` chain
marked the host's connection to its *own* address too; the local route kept it on ``lo`` and the
postrouting guard (a marked packet not leaving through the tunnel) dropped it, so ``connect()`` to
itself timed out. The evaluator says a workload talking to itself is allowed in the clear
(``failsafe:loopback``), as the eBPF datapath does (it never attaches to ``lo``).

Two web hosts on a WireGuard lab, per backend: the loaded rulesets are proven equal to the policy;
each host connects to its own address on 5432 (IPv4 and IPv6) and the echo comes back; web -> the
other web on 5432 still goes through the tunnel (the payload never crosses the bridge in the
clear, WireGuard UDP does). On the netfilter backends the old steering is then written back (the
``lo`` skip deleted from the kernel): the proof gives the counterexample ``... -> <own address>:5432
on lo: policy accepts, kernel drops`` and the connection to itself fails for real.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from stockade.compiler.ir import Direction
from stockade.evaluator import Evaluator, Verdict
from stockade.lab.wglab import WG_BACKENDS, WgLab, marker, probe, wg_lab
from stockade.model.policy import Policy
from stockade.model.rules import AllowRule, Ruleset
from stockade.model.selectors import LabelSelector
from stockade.model.services import Proto
from stockade.verify.prove import Proof
from stockade.verify.readback import prove_backend
from tests.kernel.test_wireguard import SERVICES, app, labels

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                       reason="needs wireguard-go and wireguard-tools"),
]


def _policy(lab: WgLab) -> Policy:
    rs = Ruleset("self", (LabelSelector(),), (AllowRule((app("web"),), (app("web"),), ("pg",), encrypt=True),))
    return Policy(workloads=lab.workloads(labels(h0="web", h1="web")), services=SERVICES, rulesets=(rs,))


def _prove(lab: WgLab, name: str) -> Proof:
    hints = [a for h in lab.hosts.values() for a in (h.v4, h.v6)]
    proof = prove_backend(lab.policies[name], lab.hosts[name].backend, hints=hints)
    assert proof is not None
    return proof


def _delete_lo_skip(lab: WgLab, name: str) -> None:
    """Write the old steering back into ``name``'s kernel: the steer chain's ``lo`` skip deleted
    (nftables: both families; iptables: IPv4's mangle table)."""
    h = lab.hosts[name]
    ns = ["ip", "netns", "exec", h.netns]
    if lab.backend == "nftables":
        out = subprocess.run([*ns, "nft", "-a", "list", "chain", "inet", "stockade", "steer"], capture_output=True,
                             text=True, check=True).stdout
        handles = [line.rsplit("# handle", 1)[1].strip() for line in out.splitlines()
                   if 'oif "lo"' in line and "# handle" in line]
        assert len(handles) == 1, out
        subprocess.run([*ns, "nft", "delete", "rule", "inet", "stockade", "steer", "handle", handles[0]], check=True)
        return
    tool = lab.backend  # iptables-legacy / iptables-nft
    out = subprocess.run([*ns, tool, "-t", "mangle", "-S"], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("-A ") and "STEER" in line and "-o lo" in line]
    assert len(lines) == 1, out
    subprocess.run([*ns, tool, "-t", "mangle", "-D", *shlex.split(lines[0])[1:]], check=True)


@pytest.mark.parametrize("backend", WG_BACKENDS)
def test_a_host_in_its_own_encrypted_peer_set_reaches_itself(tmp_path: Path, backend: str) -> None:
    with wg_lab(2, tmp_path, backend) as lab:
        policy = _policy(lab)
        lab.apply(policy)
        web, peer = lab.hosts["h0"], lab.hosts["h1"]
        cap = lab.capture
        assert cap is not None
        ev = Evaluator(policy)  # the policy's word: to itself allowed in the clear, to the peer encrypted
        mine = ev.evaluate(web.v4, web.v4, Proto.TCP, 5432)
        assert mine.verdict is Verdict.ALLOWED and not mine.encrypted
        assert ev.evaluate(web.v4, peer.v4, Proto.TCP, 5432).encrypted
        for name in lab.hosts:
            proof = _prove(lab, name)
            assert proof.proven, f"{name}: {proof.summary()}"

        for own in (web.v4, web.v6):  # the old steering: both time out
            assert probe(web.netns, own, own, 5432, marker(), timeout=2.0), f"{own}:5432 from itself"
        for src, dst in ((web.v4, peer.v4), (web.v6, peer.v6)):  # still through the tunnel
            cap.clear()
            m = marker()
            assert probe(web.netns, src, dst, 5432, m, timeout=2.0)
            time.sleep(0.05)
            assert not cap.seen(m), f"{m!r} crossed the underlay in the clear"
            assert cap.wireguard_packets(version=None) > 0

        if backend == "ebpf":  # never attached to lo: nothing to put back
            return
        _delete_lo_skip(lab, "h0")
        proof = _prove(lab, "h0")
        assert not proof.proven, "the old steering was proven equal"
        found = [d for d in proof.differences if d.packet.direction is Direction.OUTBOUND and d.packet.loopback]
        assert found, proof.summary()
        d = next((x for x in found if x.packet.family.value == 4), found[0])
        assert (d.packet.dport, d.policy_accepts, d.kernel_accepts) == (5432, True, False), str(d)
        # an address of the class that holds web's own (the rule's peer set: either web's)
        assert d.packet.dst in (web.v4, web.v6, peer.v4, peer.v6), str(d)
        # confirmed: the old steering drops the host's connection to itself
        assert not probe(web.netns, web.v4, web.v4, 5432, marker(), timeout=0.5)
