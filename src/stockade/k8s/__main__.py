"""Run the cluster sync beside the controller: ``python -m stockade.k8s --controller URL ...``.

The API key (admin role) is read from a file, never from the command line (it would show in
``ps``). Kubernetes access comes from ``--kubeconfig`` or, inside a cluster, the pod's service
account.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from stockade.k8s.controller_client import ControllerClient
from stockade.k8s.mapping import LabelMapping
from stockade.k8s.sync import ClusterSync
from stockade.model.workloads import EnforcementMode


def _pairs(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k8s_key, sep, target = item.partition("=")
        if not sep or not k8s_key or not target:
            raise SystemExit(f"error: mapping {item!r}: expected KUBERNETES_LABEL=STOCKADE_KEY")
        out[k8s_key] = target
    return out


async def _main(args: argparse.Namespace) -> None:
    if args.kubeconfig:
        await k8s_config.load_kube_config(config_file=str(args.kubeconfig))
    else:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    default = LabelMapping()
    mapping = LabelMapping.parse(
        _pairs(args.pod_label) if args.pod_label else dict(default.pod),
        _pairs(args.namespace_label) if args.namespace_label else dict(default.namespace),
    )
    controller = ControllerClient(args.controller, args.api_key_file.read_text().strip(), args.ca_cert)
    async with k8s.ApiClient() as api:
        networking = k8s.NetworkingV1Api(api) if args.network_policies else None
        sync = ClusterSync(k8s.CoreV1Api(api), controller, mapping, mode=EnforcementMode(args.mode),
                           networking=networking)
        try:
            await sync.run()
        finally:
            await controller.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m stockade.k8s", description=__doc__)
    ap.add_argument("--controller", required=True, help="the controller's base URL")
    ap.add_argument("--api-key-file", required=True, type=Path)
    ap.add_argument("--ca-cert", type=Path, help="CA of the controller's TLS certificate")
    ap.add_argument("--kubeconfig", type=Path, help="default: in-cluster service account")
    ap.add_argument("--pod-label", action="append", default=[], metavar="K8S_KEY=STOCKADE_KEY")
    ap.add_argument("--namespace-label", action="append", default=[], metavar="K8S_KEY=STOCKADE_KEY")
    ap.add_argument("--mode", default="full", choices=[m.value for m in EnforcementMode])
    ap.add_argument("--network-policies", action="store_true",
                    help="also enforce Kubernetes NetworkPolicies (docs/kubernetes.md; pods usually --mode selective)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
