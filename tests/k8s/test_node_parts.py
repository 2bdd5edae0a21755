"""The node agent's parts on their own: pod netns discovery by UID (a fake /proc), the chained
default-deny CNI plugin (in a real network namespace), the node's pod view, the node label."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from stockade.agent.state import Credential
from stockade.agent.transport import Enrollment
from stockade.errors import StockadeError
from stockade.k8s import cni
from stockade.k8s.mapping import LabelMapping, desired_workload
from stockade.k8s.node_agent import NodeAgent
from stockade.k8s.node_types import LocalPod, NodeOptions
from stockade.k8s.node_watch import local_pod
from stockade.k8s.podns import PodNetns, PodNetnsError, find_pod_netns
from stockade.model.labels import LabelKey

UID = "6f1c2d3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f"


def _proc(tmp: Path, procs: dict[int, tuple[str, str]]) -> Path:
    """A /proc with ``pid -> (cgroup text, netns id)``; one file per netns id (hard links share an inode)."""
    proc = tmp / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "net").write_text("host")
    spaces: dict[str, Path] = {"host": proc / "self" / "ns" / "net"}
    for pid, (cgroup, netns) in procs.items():
        d = proc / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        if netns not in spaces:
            spaces[netns] = tmp / f"netns-{netns}"
            spaces[netns].write_text(netns)
        os.link(spaces[netns], d / "ns" / "net")
    return proc


def test_a_pods_namespace_is_found_from_its_uid_in_the_cgroup_paths(tmp_path: Path) -> None:
    other = str(uuid.uuid4())
    proc = _proc(tmp_path, {
        10: ("12:pids:/system.slice/containerd.service\n", "host"),
        20: (f"11:memory:/kubepods/besteffort/pod{other}/aaa\n", "other"),
        30: (f"11:memory:/kubepods/besteffort/pod{UID}x/bbb\n", "lookalike"),  # not our pod
        40: (f"11:memory:/kubepods/besteffort/pod{UID}/ccc\n0::/\n", "ours"),
    })
    found = find_pod_netns(UID, proc)
    assert found is not None and (found.pid, found.host_network) == (40, False)
    assert found.inode == os.stat(tmp_path / "netns-ours").st_ino
    assert find_pod_netns(str(uuid.uuid4()), proc) is None


def test_the_systemd_cgroup_driver_and_host_network_pods(tmp_path: Path) -> None:
    slice_ = f"kubepods-burstable-pod{UID.replace('-', '_')}.slice"
    proc = _proc(tmp_path, {7: (f"0::/kubepods.slice/kubepods-burstable.slice/{slice_}/cri-containerd-1.scope\n",
                                "host")})
    found = find_pod_netns(UID, proc)
    assert found is not None and found.host_network  # shares the node's namespace: the host policy covers it


def test_the_incremental_index_finds_what_the_full_scan_finds_and_a_late_join(tmp_path: Path) -> None:
    """NamespaceIndex (the node agent's finder) against find_pod_netns on the same fake /proc: the
    same answers, a process that joins its pod's cgroup after it was first seen is found, an
    ended one is forgotten, and only new or young processes are read again."""
    from stockade.k8s.podns import NamespaceIndex, cgroup_pod_uid

    other = str(uuid.uuid4())
    proc = _proc(tmp_path, {
        10: ("12:pids:/system.slice/containerd.service\n", "host"),
        20: (f"11:memory:/kubepods/besteffort/pod{other}/aaa\n", "other"),
        30: (f"11:memory:/kubepods/besteffort/pod{UID}x/bbb\n", "lookalike"),
    })
    index = NamespaceIndex(proc, min_gap=0.0, young=60.0, full_every=3600.0)
    assert index.find(UID) is None and find_pod_netns(UID, proc) is None
    assert index.find(other) == find_pod_netns(other, proc)
    (proc / "10" / "cgroup").write_text(f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/c\n")  # joined
    time.sleep(0.01)  # a young process is read again once an eighth of its age has passed since its last read
    assert index.find(UID) == find_pod_netns(UID, proc) and index.find(UID) is not None
    assert cgroup_pod_uid(f"1:pids:/kubepods/pod{UID}x/b\n") is None  # a lookalike is no pod
    shutil.rmtree(proc / "20")
    assert index.find(other) is None


def test_the_index_reads_young_processes_less_and_less_and_spreads_the_full_reread(tmp_path: Path) -> None:
    """A burst of new processes on a busy node was read again at every 10 ms scan for 2 s, and every
    process again all at once every second: the scans a new pod's sandbox waited behind. A young
    process without a pod is now read again once an eighth of its age has passed (every scan at
    first: a late join is still seen at once), and the full re-read of every process within
    ``full_every`` is spread over the scans; a pid reused by a pod's process is still found in time."""
    from stockade.k8s.podns import NamespaceIndex

    proc = _proc(tmp_path, {pid: ("12:pids:/system.slice/x.service\n", "host") for pid in range(100, 140)})
    young = NamespaceIndex(proc, min_gap=0.0, young=2.0, full_every=3600.0)
    full = NamespaceIndex(proc, min_gap=0.0, young=0.0, full_every=1.0)
    for i in range(200):  # 2 s of scans 10 ms apart
        young._scan(i * 0.01)
        if i == 30:  # a young process (0.3 s) joins its pod's cgroup: seen within an eighth of its age
            (proc / "101" / "cgroup").write_text(f"11:memory:/kubepods/besteffort/pod{UID}/a\n")
        if i == 35:
            assert young._by_uid.get(UID) == [101]
    assert young.reads <= 40 * 40, young.reads  # was 40 * 200 (every young process at every scan)
    full._scan(0.0)
    (proc / "100" / "cgroup").write_text(f"11:memory:/kubepods/besteffort/pod{UID}/a\n")  # a pid reused
    per_scan = []
    for i in range(1, 101):
        before = full.reads
        full._scan(i * 0.01)
        per_scan.append(full.reads - before)
    assert sum(per_scan) >= 40 and max(per_scan) <= 6, per_scan  # all read again within 1 s, never all at once
    assert full._by_uid.get(UID) == [100, 101]


def test_a_malformed_uid_is_refused() -> None:
    with pytest.raises(PodNetnsError):
        find_pod_netns("../../etc", Path("/proc"))


def test_the_node_view_of_a_pod() -> None:
    obj = {"metadata": {"name": "web", "namespace": "shop", "uid": UID},
           "spec": {"nodeName": "n1", "hostNetwork": False},
           "status": {"phase": "Running", "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}]}}
    pod = local_pod(obj)
    assert not isinstance(pod, str)
    assert (pod.workload, pod.addresses, pod.ready) == ("k8s.shop.web", ("10.1.0.5", "fd00::5"), True)
    done = local_pod({**obj, "status": {"phase": "Succeeded", "podIPs": [{"ip": "10.1.0.5"}]}})
    assert not isinstance(done, str) and not done.ready
    assert isinstance(local_pod({**obj, "metadata": {"name": "web", "namespace": "shop", "uid": "x"}}), str)
    # bound, no sandbox or IP yet: taken up (its workload is address-less until the IP comes)
    pending = local_pod({**obj, "status": {"phase": "Pending"}})
    assert not isinstance(pending, str) and pending.ready and pending.addresses == ()


def test_the_sync_binds_a_pod_to_its_node_through_the_declared_node_label() -> None:
    pod = {"metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
           "spec": {"nodeName": "node-1"}, "status": {"podIPs": [{"ip": "10.1.0.5"}]}}
    keys = {"app": LabelKey("app"), "k8s-node": LabelKey("k8s-node")}
    got = desired_workload(pod, {}, LabelMapping(), keys)
    assert not hasattr(got, "reason") and dict(got.labels) == {"app": "web", "k8s-node": "node-1"}  # type: ignore[union-attr]
    undeclared = desired_workload(pod, {}, LabelMapping(), {"app": LabelKey("app")})
    assert dict(undeclared.labels) == {"app": "web"}  # type: ignore[union-attr]
    with_ns = desired_workload(pod, {}, LabelMapping(), {**keys, "k8s-namespace": LabelKey("k8s-namespace")})
    assert dict(with_ns.labels)["k8s-namespace"] == "shop"  # type: ignore[union-attr]  # map: keys=app,k8s-namespace
    bad = desired_workload({**pod, "spec": {"nodeName": "x" * 200}}, {}, LabelMapping(), keys)
    assert "spec.nodeName" in bad.reason  # type: ignore[union-attr]


def test_the_cni_plugin_answers_version_and_refuses_nonsense() -> None:
    assert "1.0.0" in json.loads(cni.run({"CNI_COMMAND": "VERSION"}, ""))["supportedVersions"]
    assert cni.run({"CNI_COMMAND": "DEL"}, "{}") == ""
    with pytest.raises(cni.CniError, match="CNI_NETNS"):
        cni.run({"CNI_COMMAND": "ADD", "CNI_NETNS": "relative"}, "{}")
    with pytest.raises(cni.CniError, match="not JSON"):
        cni.run({"CNI_COMMAND": "ADD", "CNI_NETNS": "/x"}, "{")
    with pytest.raises(StockadeError, match="table name"):  # nothing unvalidated reaches the ruleset
        cni.run({"CNI_COMMAND": "ADD", "CNI_NETNS": "/x"}, json.dumps({"table": "bad table;"}))


@pytest.mark.kernel
def test_the_cni_plugin_closes_a_new_sandbox_and_passes_the_result_on() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ns = f"cni-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.9.9.9/24"}]}
        conf = {"cniVersion": "1.0.0", "name": "t", "type": "stockade-default-deny", "prevResult": prev}
        env = {"CNI_COMMAND": "ADD", "CNI_NETNS": f"/run/netns/{ns}", "CNI_ARGS": "K8S_POD_NAMESPACE=shop"}
        assert json.loads(cni.run(env, json.dumps(conf))) == prev
        listing = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "stockade"],
                                 capture_output=True, text=True, check=True).stdout
        assert listing.count("policy drop;") == 3 and "ct state established,related accept" in listing
        # a namespace that opts out is left open
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "stockade"], check=True)
        cni.run(env, json.dumps({**conf, "exceptNamespaces": ["shop"]}))
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "stockade"],
                           capture_output=True, text=True, check=False)
        assert r.returncode != 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


class _Enroller:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def enroll(self, workload: str, public_key: str) -> tuple[Enrollment, None]:
        self.calls.append(workload)
        return Enrollment("a1", "agt_a1_x", workload), None

    def stop(self) -> None:
        return


def test_a_pod_seen_mid_sandbox_in_the_nodes_namespace_is_not_left_to_the_host_policy(tmp_path: Path) -> None:
    """Looked for from its binding on, a pod is seen while its sandbox is made: a process in the pod's
    cgroup still in the node's namespace. A pod whose spec is not hostNetwork is then not found yet
    (looked for again), never marked host-network (unenforced, left to the host policy)."""
    in_node = PodNetns(UID, 4242, 1, host_network=True)
    agent = NodeAgent(NodeOptions("n1", "http://127.0.0.1:9", tmp_path), finder=lambda uid: in_node)
    enroller = _Enroller()
    agent.enroller = enroller  # type: ignore[assignment]
    agent.client = object()  # type: ignore[assignment]
    agent.credential = Credential("http://127.0.0.1:9", "node", "t", "n1")
    try:
        pod = LocalPod(UID, "shop", "web", "k8s.shop.web", ())
        assert agent._start_pod_held(pod, 0.0) is False
        assert enroller.calls == ["k8s.shop.web"] and agent.enforced() == {}
        assert UID not in agent._host_network and UID in agent._awaiting  # looked for again, soon
        # a pod whose spec says hostNetwork and that runs in the node's namespace: the host policy's
        assert agent._start_pod_held(dataclasses.replace(pod, host_network=True), 0.0) is True
        assert UID in agent._host_network
    finally:
        agent.client = None
        agent.stop()


def test_a_pod_awaiting_its_sandbox_holds_other_pods_deltas_back(tmp_path: Path) -> None:
    """A pod enrolled (its policy in hand) whose sandbox is not there yet may start any moment: other
    pods' deltas wait meanwhile (bounded by AWAIT_HOLD and the gate's max_defer), so its start does
    not find deltas admitted just before it under way. Its start takes the hold over; a pod no longer
    wanted releases it."""
    from stockade.agent.apply_gate import Priority

    agent = NodeAgent(NodeOptions("n1", "http://127.0.0.1:9", tmp_path), finder=lambda uid: None)
    agent.gate.max_defer = agent.gate.timed_defer = 30
    agent.enroller = _Enroller()  # type: ignore[assignment]
    agent.client = object()  # type: ignore[assignment]
    agent.credential = Credential("http://127.0.0.1:9", "node", "t", "n1")
    entered: list[int] = []

    def delta() -> None:
        with agent.gate.admit(Priority.DELTA):
            entered.append(1)

    try:
        pod = LocalPod(UID, "shop", "web", "k8s.shop.web", ())
        assert agent._start_pod(pod) is False and UID in agent._awaiting  # no sandbox yet
        t = threading.Thread(target=delta, daemon=True)
        t.start()
        t.join(0.2)
        assert not entered and not agent.gate.idle()  # held while the pod awaits its sandbox
        assert agent._start_pod(pod) is False  # a start (still no sandbox) ends its hold and takes it up again
        t.join(0.2)
        assert not entered
        agent._reconcile()  # the pod is not wanted (never set): its hold ends
        t.join(5)
        assert entered == [1] and UID not in agent._awaiting and agent.gate.idle()
    finally:
        agent.client = None
        agent.stop()


@pytest.mark.kernel
def test_a_pods_namespace_is_pinned_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """pin() bind-mounts the namespace itself (no ``ip netns attach`` process) once ``ip netns`` has set
    up /run/netns, and the pin is that very namespace; unpin removes it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from stockade.k8s import podns

    ns = f"h15g-pin-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)  # also makes /run/netns ip's shared mount
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "60"])
    uid = str(uuid.uuid4())
    try:
        time.sleep(0.2)
        inode = os.stat(f"/run/netns/{ns}").st_ino
        assert wait_for_inode(proc.pid, inode)
        real_run = subprocess.run

        def no_attach(argv: list[str], *a: object, **kw: object) -> object:
            assert argv[:3] != ["ip", "netns", "attach"], "pinned by a process"
            return real_run(argv, *a, **kw)  # type: ignore[call-overload]

        monkeypatch.setattr(podns.subprocess, "run", no_attach)
        name = podns.pin(podns.PodNetns(uid, proc.pid, inode, False), "h15g-")
        assert name == f"h15g-{uid}" and podns.pinned_inode(uid, "h15g-") == inode
        monkeypatch.undo()
        podns.unpin(uid, "h15g-")
        assert podns.pinned_inode(uid, "h15g-") is None
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "netns", "del", f"h15g-{uid}"], capture_output=True, check=False)


def wait_for_inode(pid: int, inode: int) -> bool:
    for _ in range(100):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def test_the_node_agent_is_settled_only_when_no_start_apply_or_proof_is_pending(tmp_path: Path) -> None:
    """"At rest" (bench/k8s.py) starts when the node agent says it is settled: a pod's proof asked for
    (an apply since its last proof) or running, anything in the apply gate, or a collection due after
    proofs is start-up work still under way, not rest."""
    from types import SimpleNamespace

    from stockade.agent import proving
    from stockade.agent.apply_gate import Priority
    from stockade.k8s.node_agent import _Running

    agent = NodeAgent(NodeOptions("n1", "http://127.0.0.1:9", tmp_path), finder=lambda uid: None)
    proofs = proving.ProofLoop(object(), lambda *a: None, lambda: 1, threading.Event(),  # type: ignore[arg-type]
                               interval=300.0, collections=proving.Collections(background=False))
    pod = LocalPod(UID, "shop", "web", "k8s.shop.web", ())
    try:
        assert agent.settled()  # nothing wanted, nothing running
        agent._running[UID] = _Running(pod, "stk-x", SimpleNamespace(proofs=proofs), None, 0.0)  # type: ignore[arg-type]
        assert agent.settled()
        proofs.poke.set()  # applied since its last proof: a proof is due
        assert not agent.settled()
        proofs.poke.clear()
        agent.gate.begin_hold()  # a pod starting
        assert not agent.settled()
        agent.gate.end_hold()
        with agent.gate.admit(Priority.DELTA):  # an apply running
            assert not agent.settled()
        assert agent.settled()
    finally:
        agent._running.clear()
        agent.stop()
