"""A new pod's first apply, the kernel step alone: ``nft -f`` + listings vs one netlink batch + dump.

    python bench/pod_apply.py                     # 30 interleaved rounds, a 110-pod node's server pod
    python bench/pod_apply.py --rounds 50 --peers 55 --rules 4

What the node agent does when a pod's enrolment brings its first policy (``Enforcer.enforce``:
render, apply, structural verify and tamper baseline), timed in fresh namespaces that hold the
CNI's default-deny table (as a new pod's does), the two paths interleaved round by round:

* ``nft``: :class:`NftablesBackend` (``ip netns exec <ns> nft -f``, then ``nft list`` and
  ``nft -j list``: three processes in the namespace);
* ``netlink``: :class:`NetlinkTableBackend` (one nf_tables batch on a socket opened in the
  namespace, one netlink dump; the shape's template learnt before the first round, as a node
  agent learns it at its first pod of a label set: that one-off cost is printed apart).

Prints p50 / p90 / max per path and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import time
import uuid

from stockade.agent.enforcer import Enforcer
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.netlink_apply import NetlinkTableBackend, TemplateCache
from stockade.k8s.cni import default_deny
from stockade.model.workloads import EnforcementMode
from stockade.verify.samples import random_host_policy

TABLE = "stockade"


def _ns() -> str:
    name = f"stk-pa-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=default_deny(TABLE), text=True, check=True)
    return name


def _drop(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


def _row(name: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=10) if len(ms) > 1 else ms * 9
    return f"| {name} | {len(ms)} | {statistics.median(ms):,.1f} | {q[8]:,.1f} | {max(ms):,.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rules", type=int, default=4)
    ap.add_argument("--peers", type=int, default=55, help="peer-set members (a 110-pod node's server pod: 55)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    load0 = os.getloadavg()
    hp = random_host_policy(random.Random(args.seed), rules=args.rules, peers=args.peers, sets=2,
                            mode=EnforcementMode.FULL)
    templates = TemplateCache()
    times: dict[str, list[float]] = {"nft": [], "netlink": []}
    learn_ms = 0.0
    try:
        ns = _ns()
        try:
            t = time.perf_counter()
            templates.template_for(NetlinkTableBackend(TABLE, netns=ns, templates=templates).render(hp))
            learn_ms = (time.perf_counter() - t) * 1000
        finally:
            _drop(ns)
        for i in range(args.rounds):
            order = ("nft", "netlink") if i % 2 == 0 else ("netlink", "nft")
            for path in order:
                ns = _ns()
                try:
                    backend = (NftablesBackend(TABLE, netns=ns) if path == "nft"
                               else NetlinkTableBackend(TABLE, netns=ns, templates=templates))
                    enforcer = Enforcer(backend)
                    t = time.perf_counter()
                    enforcer.enforce(hp)
                    times[path].append((time.perf_counter() - t) * 1000)
                    if isinstance(backend, NetlinkTableBackend) and backend.last_path != "netlink":
                        raise SystemExit(f"round {i}: the netlink path fell back to nft")
                    backend.close()
                finally:
                    _drop(ns)
    finally:
        templates.close()
    load1 = os.getloadavg()
    print(f"first apply of a pod (render + apply + verify + baseline), {args.rules} rules, "
          f"{args.peers} peers, {args.rounds} interleaved rounds")
    print("| path | n | p50 ms | p90 ms | max ms |")
    print("|---|---|---|---|---|")
    print(_row("nft -f + 2 listings (3 processes)", times["nft"]))
    print(_row("netlink batch + dump (no process)", times["netlink"]))
    print(f"template learnt once per shape: {learn_ms:,.1f} ms (nft -f + verify + dump in a scratch namespace)")
    print(f"load average {load0[0]:.1f} before, {load1[0]:.1f} after ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
