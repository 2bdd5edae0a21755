"""The CNI plugin's host wrapper (``stockade k8s cni-install``): with no node agent running, ADD fails
closed (the runtime does not start the pod) while DEL/CHECK succeed (a pod can still be torn down);
a pidfile naming a process without the image's Python is no agent; unsafe paths are refused.
(The wrapper entering a real agent container is proven by tests/k8s/test_install.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.k8s.cni import CniError, host_wrapper


def _call(wrapper: Path, command: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, "CNI_NETNS": "/run/netns/x"}
    return subprocess.run(["sh", str(wrapper)], input="{}", capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize("pid", [None, "", "not-a-pid", "1; rm -rf /", "self"])
def test_without_a_node_agent_add_fails_closed_and_del_succeeds(tmp_path: Path, pid: str | None) -> None:
    pidfile = tmp_path / "node-agent.pid"
    if pid is not None:  # "self": a live process, but not an agent container (no image Python under its root)
        pidfile.write_text(str(os.getpid()) if pid == "self" else pid)
    out = subprocess.run([sys.executable, "-m", "stockade.cli", "k8s", "cni-install", str(tmp_path),
                          "--agent-pidfile", str(pidfile)], capture_output=True, text=True, check=True)
    wrapper = tmp_path / "stockade-default-deny"
    assert str(wrapper) in out.stdout and os.access(wrapper, os.X_OK)
    add = _call(wrapper, "ADD")
    assert add.returncode == 1 and json.loads(add.stdout)["msg"] == "stockade-default-deny"
    for command in ("DEL", "CHECK"):
        assert _call(wrapper, command).returncode == 0
    version = _call(wrapper, "VERSION")
    assert version.returncode == 0 and "1.0.0" in json.loads(version.stdout)["supportedVersions"]


@pytest.mark.parametrize("bad", ["relative/x.pid", "/a/../b.pid", "/x.pid; reboot", "/x $(id).pid", "/x'.pid"])
def test_unsafe_pidfile_paths_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(CniError, match="pidfile"):
        host_wrapper(bad)
    r = subprocess.run([sys.executable, "-m", "stockade.cli", "k8s", "cni-install", str(tmp_path), "--agent-pidfile",
                        bad], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "pidfile" in r.stderr and not (tmp_path / "stockade-default-deny").exists()
