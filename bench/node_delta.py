"""The node agent's per-pod cost of one peer-set change (issue 15), before vs after, interleaved.

    python bench/node_delta.py                    # 55 pods sharing the delta, 30 rounds
    python bench/node_delta.py --pods 55 --full 10 --rounds 30

When a pod comes or goes, the controller bumps ~55 pods of a 110-pod node and answers the node's
long-poll with each one's update; the node agent then decodes them and applies each in its pod's
namespace. Two steps of that, each timed both ways in one process, round by round:

* **decode the answer** (``k8s.node_poll.poll_pods``): ``--pods`` entries carrying the same set
  delta (the controller encodes it once) and ``--full`` entries carrying full policies (pods whose
  revision fell out of the controller's 8-step history, common under churn), whose address sets
  the pods share. Before: every entry decoded on its own (``ip_network`` per CIDR per pod); after:
  through one :class:`~stockade.compiler.delta.SharedDecode` per answer;
* **a full policy that only moves set members**, in a real namespace with the netlink backend:
  before, ``Enforcer.enforce`` (render, one batch replacing the table, structural verify, baseline);
  after, ``Enforcer.enforce_as_delta`` (the member difference as one element batch, one read-back).

Prints p50 / p90 / max per path and the load average before and after.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import statistics
import subprocess
import time
import uuid
from dataclasses import replace

from stockade.agent.enforcer import Enforcer
from stockade.backends.nftables.netlink_apply import NetlinkTableBackend, TemplateCache
from stockade.compiler.delta import PolicyUpdate, SharedDecode, policy_update_from_dict
from stockade.compiler.ir import HostPolicy, SetDelta
from stockade.controller.services.node_distribution import HeldPod, encode_answer
from stockade.k8s.cni import default_deny
from stockade.model.workloads import EnforcementMode
from stockade.verify.samples import random_host_policy

TABLE = "stockade"


def _row(name: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else ms * 9
    return f"| {name} | {len(ms)} | {statistics.median(ms):,.2f} | {q[8]:,.2f} | {max(ms):,.2f} |"


def _answer(hp: HostPolicy, pods: int, full: int) -> bytes:
    s = hp.sets[0]
    net = ipaddress.ip_network("10.250.0.0/24")
    delta = SetDelta(s.name, s.family, (net,), ())
    moved = [(HeldPod(f"pod-{i}", f"w{i}", 4), PolicyUpdate.delta(4, 5, (delta,))) for i in range(pods)]
    moved += [(HeldPod(f"lag-{i}", f"l{i}", 1), PolicyUpdate.full(5, replace(hp, workload=f"l{i}")))
              for i in range(full)]
    return encode_answer(moved, [])


def _decode(body: bytes, shared: bool) -> float:
    t = time.perf_counter()
    data = json.loads(body)
    memo = SharedDecode() if shared else None
    for p in data["pods"]:
        policy_update_from_dict(p["policy"], shared=memo)
    return (time.perf_counter() - t) * 1000


def _moved(hp: HostPolicy, i: int) -> HostPolicy:
    """``hp`` with one member of its first set swapped for another (rules unchanged)."""
    s = hp.sets[0]
    extra = ipaddress.ip_network(f"10.251.{i % 250}.0/24")
    members = tuple(sorted({*s.members[1:], extra}, key=lambda n: (int(n.network_address), n.prefixlen)))
    return replace(hp, sets=(replace(s, members=members), *hp.sets[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--pods", type=int, default=55, help="entries sharing one set delta")
    ap.add_argument("--full", type=int, default=10, help="entries carrying a full policy")
    ap.add_argument("--peers", type=int, default=55)
    ap.add_argument("--rules", type=int, default=4)
    args = ap.parse_args()
    load0 = os.getloadavg()
    hp = random_host_policy(random.Random(1), rules=args.rules, peers=args.peers, sets=2, mode=EnforcementMode.FULL)
    body = _answer(hp, args.pods, args.full)
    times: dict[str, list[float]] = {k: [] for k in ("dec-old", "dec-new", "full", "delta")}
    ns = f"stk-nd-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    templates = TemplateCache()
    try:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=default_deny(TABLE), text=True,
                       check=True)
        backend = NetlinkTableBackend(TABLE, netns=ns, templates=templates)
        enforcer = Enforcer(backend)
        enforcer.enforce(hp)
        current = hp
        for i in range(args.rounds):
            for shared in ((False, True) if i % 2 == 0 else (True, False)):
                times["dec-new" if shared else "dec-old"].append(_decode(body, shared))
            for as_delta in ((False, True) if i % 2 == 0 else (True, False)):
                nxt = _moved(current, 2 * i + as_delta)
                t = time.perf_counter()
                if as_delta:
                    if not enforcer.enforce_as_delta(nxt):
                        raise SystemExit(f"round {i}: the member change was not applied as a delta")
                else:
                    enforcer.enforce(nxt)
                times["delta" if as_delta else "full"].append((time.perf_counter() - t) * 1000)
                current = nxt
        if enforcer.check() is not None:
            raise SystemExit("the ruleset in force differs from its baseline after the rounds")
        backend.close()
    finally:
        templates.close()
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
    load1 = os.getloadavg()
    print(f"node answer: {args.pods} pods sharing a set delta + {args.full} full policies "
          f"({len(body):,} bytes); a pod's policy: {args.rules} rules, {args.peers} peers; {args.rounds} rounds")
    print("| step | n | p50 ms | p90 ms | max ms |")
    print("|---|---|---|---|---|")
    print(_row("decode the answer, each entry on its own (before)", times["dec-old"]))
    print(_row("decode the answer, shared parts once (after)", times["dec-new"]))
    print(_row("a full policy moving set members: full reload + verify (before)", times["full"]))
    print(_row("the same as a member delta + read-back (after)", times["delta"]))
    print(f"load average {load0[0]:.1f} before, {load1[0]:.1f} after ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
