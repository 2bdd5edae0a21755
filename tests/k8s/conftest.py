"""A real kube-apiserver + etcd for the Kubernetes tests (tests/k8s/k8s.sh does the work).

``k8s_cluster`` (session scope) builds the binaries once into ``$STOCKADE_K8S_CACHE`` (default
/var/cache/stockade/k8s: outside the clone, so CI and later runs reuse them), starts etcd with a
fresh data dir and the apiserver on free loopback ports, and stops exactly the two processes it
started. While it runs, the session's pod ranges (a random /24 of 10.244.0.0/16 and a /64 of
fd44:244::/48, see :class:`Cluster`) have a ``blackhole`` route in the root namespace, so a probe
to a pod that is not up yet fails here instead of leaving the machine by the default route.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("k8s.sh")
BLACKHOLE_METRIC = "4242"


@dataclass(frozen=True)
class Cluster:
    url: str
    token: str
    ca_cert: Path
    kubeconfig: Path
    run_dir: Path
    pod_v4: ipaddress.IPv4Network
    pod_v6: ipaddress.IPv6Network


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ports_env() -> dict[str, str]:
    return {
        **os.environ,
        "K8S_ETCD_PORT": str(_free_port()),
        "K8S_ETCD_PEER_PORT": str(_free_port()),
        "K8S_API_PORT": str(_free_port()),
    }


@contextlib.contextmanager
def blackholed(*nets: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Iterator[None]:
    added = []
    try:
        if os.geteuid() == 0 and shutil.which("ip"):
            for net in nets:
                fam = "-6" if net.version == 6 else "-4"
                # a high metric: a test's own link into the lab (a connected route) still wins while it exists
                add = ["ip", fam, "route", "add", "blackhole", str(net), "metric", BLACKHOLE_METRIC]
                if subprocess.run(add, check=False).returncode == 0:
                    added.append((fam, net))
        yield
    finally:
        for fam, net in added:
            subprocess.run(["ip", fam, "route", "del", "blackhole", str(net), "metric", BLACKHOLE_METRIC], check=False)


class ApiServer:
    """The session's processes, for tests that restart the apiserver."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir, self.env = run_dir, env

    def _script(self, command: str) -> None:
        subprocess.run([str(SCRIPT), command, str(self.run_dir)], env=self.env, check=True, timeout=120)

    def start(self) -> None:
        self._script("start")

    def stop(self) -> None:
        self._script("stop")

    def restart_apiserver(self) -> None:
        self._script("restart-apiserver")


@pytest.fixture(scope="session")
def k8s_control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, ApiServer]]:
    env = _ports_env()
    bin_dir = Path(subprocess.run([str(SCRIPT), "bin-dir"], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip())
    if not ((bin_dir / "etcd").exists() and (bin_dir / "kube-apiserver").exists()):
        if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
            pytest.skip("Go is needed to build kube-apiserver and etcd once (tests/k8s/k8s.sh build)")
        subprocess.run([str(SCRIPT), "build"], env=env, check=True, timeout=3600)
    run_dir = tmp_path_factory.mktemp("k8s")
    server = ApiServer(run_dir, env)
    r = secrets.randbelow(256)
    pod_v4 = ipaddress.IPv4Network(f"10.244.{r}.0/24")
    pod_v6 = ipaddress.IPv6Network(f"fd44:244:0:{r:x}::/64")
    with blackholed(pod_v4, pod_v6):
        server.start()
        try:
            values = dict(line.split("=", 1) for line in (run_dir / "env").read_text().split())
            cluster = Cluster(
                url=values["K8S_API"],
                token=Path(values["K8S_TOKEN_FILE"]).read_text().strip(),
                ca_cert=Path(values["K8S_CA"]),
                kubeconfig=run_dir / "kubeconfig",
                run_dir=run_dir,
                pod_v4=pod_v4,
                pod_v6=pod_v6,
            )
            yield cluster, server
        finally:
            server.stop()


@pytest.fixture(scope="session")
def k8s_cluster(k8s_control: tuple[Cluster, ApiServer]) -> Cluster:
    return k8s_control[0]


# The real node (tests/k8s/node_fixture.py), registered once for the directory: a session fixture imported into
# two test modules would be two fixtures, and the second would wait forever for the first one's machine lock.
from tests.k8s.node_fixture import k8s_node  # noqa: E402
from tests.k8s.test_helm import helm  # noqa: E402

__all__ = ["helm", "k8s_node"]
