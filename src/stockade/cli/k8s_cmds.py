"""``stockade k8s``: the Kubernetes node agent, its CNI plugin and the install manifests (issue 15).

* ``stockade k8s node-agent --node NAME ...``: :mod:`stockade.k8s.node_agent` fed by
  :mod:`stockade.k8s.node_watch` (runs in the DaemonSet's pod, or beside a kubelet);
* ``stockade k8s cni``: the chained default-deny CNI plugin (:mod:`stockade.k8s.cni`);
  ``stockade k8s cni-install DIR``: its host wrapper, from the DaemonSet's init container;
* ``stockade k8s manifests``: the DaemonSet, the sync Deployment and their RBAC, for given values.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import click

from stockade.cli import main

CODE_ENV = "STOCKADE_ACTIVATION_CODE"


@main.group("k8s")
def k8s_group() -> None:
    """Kubernetes: node agent, CNI default-deny plugin, install manifests."""


@k8s_group.command("node-agent")
@click.option("--node", default=lambda: os.environ.get("NODE_NAME"), required=True,
              help="This node's name (spec.nodeName; default $NODE_NAME from the downward API).")
@click.option("--controller", required=True, help="Controller URL.")
@click.option("--activation-code-file", "code_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"First run only: the node's activation code (or ${CODE_ENV}).")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The controller's CA certificate (PEM), pinned.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Default: the pod's service account (in-cluster).")
@click.option("--state-dir", type=click.Path(path_type=Path), default=Path("/var/lib/stockade/node"),
              show_default=True)
@click.option("--table", default="stockade", show_default=True, help="nftables table the agent owns.")
@click.option("--host-policy/--no-host-policy", default=True, show_default=True,
              help="Also enforce the node's own host policy in its namespace.")
@click.option("--pod-tamper-interval", type=float, default=10.0, show_default=True,
              help="Seconds between read-backs of each pod's table.")
@click.option("--long-poll", type=float, default=20.0, show_default=True)
@click.option("--node-poll/--per-pod-poll", default=True, show_default=True,
              help="The node protocol: one long-poll, ack batch and batch enrolment for all the node's pods. "
                   "--per-pod-poll: every pod's runtime long-polls, acknowledges and heartbeats on its own (the "
                   "protocol before session 7; for controllers without the node routes).")
@click.option("--pod-netlink/--pod-nft", default=True, show_default=True,
              help="Pods' full applies and read-backs as netlink batches in their namespaces (--pod-nft: "
                   "`nft -f` and listings, one process each).")
@click.option("--pod-change-feed/--no-pod-change-feed", default=True, show_default=True,
              help="Wake each pod's tamper watch by nf_tables' netlink group in its namespace (one socket per pod); "
                   "without it a pod's table is read back every --pod-tamper-interval only.")
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write this process's PID here (the CNI host wrapper of `k8s cni-install` runs the plugin in "
                   "this process's mount namespace).")
@click.option("--frozen-heap/--no-frozen-heap", default=True, show_default=True,
              help="Keep the long-lived heap out of the collections after proofs (gc.freeze; a deep collection "
                   "once a minute when no pod is starting). Off: a full collection every 2 s at most.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def node_agent(node: str, controller: str, code_file: Path | None, ca_cert: Path | None, kubeconfig: Path | None,
               state_dir: Path, table: str, host_policy: bool, pod_tamper_interval: float, long_poll: float,
               node_poll: bool, pod_netlink: bool, pod_change_feed: bool, pidfile: Path | None,
               frozen_heap: bool, log_level: str) -> None:
    """Enforce every pod of this node inside its own network namespace (plus the node's host policy)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    code = os.environ.pop(CODE_ENV, None)
    if code_file is not None:
        code = code_file.read_text().strip()
    from stockade.agent.state import StateDir
    from stockade.k8s.node_agent import NodeAgent
    from stockade.k8s.node_types import NodeOptions

    if ca_cert is not None:
        StateDir(state_dir / "node").save_ca(ca_cert.read_text())
    options = NodeOptions(node=node, controller=controller, state_dir=state_dir, activation_code=code, table=table,
                          host_policy=host_policy, long_poll_seconds=long_poll,
                          pod_tamper_interval=pod_tamper_interval, node_poll=node_poll, pod_netlink=pod_netlink,
                          pod_change_feed=pod_change_feed, frozen_heap=frozen_heap)
    agent = NodeAgent(options)
    if pidfile is not None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        part = pidfile.with_name(pidfile.name + ".part")
        part.write_text(f"{os.getpid()}\n")
        part.replace(pidfile)
    try:
        asyncio.run(_run_node(agent, kubeconfig))
    finally:
        if pidfile is not None and pidfile.read_text().strip() == str(os.getpid()):
            pidfile.unlink()


async def _run_node(agent: object, kubeconfig: Path | None) -> None:
    from kubernetes_asyncio import client as k8s
    from kubernetes_asyncio import config as k8s_config

    from stockade.k8s.node_agent import NodeAgent
    from stockade.k8s.node_watch import PodWatch

    assert isinstance(agent, NodeAgent)
    cfg = k8s.Configuration()
    if kubeconfig is not None:
        await k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    else:
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent.start()
    async with k8s.ApiClient(cfg) as api:
        watch = asyncio.create_task(PodWatch(k8s.CoreV1Api(api), agent).run())
        await stop.wait()
        watch.cancel()
    await asyncio.to_thread(agent.stop)


@k8s_group.command("manifests")
@click.option("--controller", required=True, help="Controller URL the agents and the sync use.")
@click.option("--image", required=True, help="The Stockade image (deploy/image/build.sh).")
@click.option("--namespace", default="stockade", show_default=True)
@click.option("--pull-policy", type=click.Choice(["Always", "IfNotPresent", "Never"]), default="IfNotPresent",
              show_default=True)
@click.option("--host-policy/--no-host-policy", default=True, show_default=True)
@click.option("--node-poll/--per-pod-poll", default=True, show_default=True,
              help="The node agents' protocol: one long-poll per node (default) or one per pod.")
@click.option("--ca/--no-ca", "with_ca", default=True, show_default=True,
              help="Pin the controller's CA from ConfigMap stockade-ca (key ca.pem).")
@click.option("--sync/--no-sync", default=True, show_default=True, help="Include the cluster sync Deployment.")
@click.option("--cni-bin-dir", default="/opt/cni/bin", show_default=True)
@click.option("--create-namespace/--no-create-namespace", default=True, show_default=True,
              help="Include the Namespace object.")
@click.option("--api-server", default="", metavar="HOST:PORT",
              help="The apiserver's address for the node agent (nodes without kube-proxy; default: the Service).")
def manifests_cmd(controller: str, image: str, namespace: str, pull_policy: str, host_policy: bool, node_poll: bool,
                  with_ca: bool, sync: bool, cni_bin_dir: str, create_namespace: bool, api_server: str) -> None:
    """Print the DaemonSet, the sync Deployment and their least-privilege RBAC (YAML)."""
    from stockade.k8s.manifests import ManifestValues, render

    try:
        values = ManifestValues(controller, image, namespace=namespace, pull_policy=pull_policy,
                                host_policy=host_policy, node_poll=node_poll, with_ca=with_ca, sync=sync,
                                cni_bin_dir=cni_bin_dir, create_namespace=create_namespace, api_server=api_server)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(render(values), nl=False)


@k8s_group.command("cni-install")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--agent-pidfile", required=True, help="Where the node agent writes its (host) PID.")
def cni_install(directory: Path, agent_pidfile: str) -> None:
    """Install the default-deny CNI plugin's host wrapper into DIRECTORY (the node's CNI bin dir)."""
    from stockade.k8s import cni as plugin

    try:
        click.echo(f"installed {plugin.install(directory, agent_pidfile)}")
    except plugin.CniError as exc:
        raise click.UsageError(str(exc)) from None


@k8s_group.command("cni", context_settings={"ignore_unknown_options": True})
def cni() -> None:
    """Run as the chained CNI plugin (reads CNI_COMMAND etc. from the environment)."""
    from stockade.k8s import cni as plugin

    plugin.main()
