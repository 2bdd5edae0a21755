"""A chained CNI plugin: every new pod sandbox starts default-deny, before any container runs.

This is how a new pod is protected before its first connection (issue 15): the container
runtime runs the CNI chain while it *creates the sandbox*, before it starts the pod's
containers, so a rule put in the sandbox's network namespace here is in force for the pod's
first packet. The node agent's first apply for the pod replaces this table atomically by the
pod's real policy (same ``inet stockade`` table: ``table; delete table; definition`` in one
transaction), so there is never a moment without either.

Chain it after the network plugin (e.g. ``bridge``) in the node's ``.conflist``::

    {"type": "stockade-default-deny", "table": "stockade", "exceptNamespaces": ["kube-system"]}

``exceptNamespaces`` (from ``CNI_ARGS`` ``K8S_POD_NAMESPACE``, set by containerd and CRI-O) are
left open until their agent applies: a namespace opts out of protection-at-birth there. The
executable on the CNI path is a small wrapper running ``python -m stockade.k8s.cni``. Beside a
node agent installed from packages that is two lines; from the DaemonSet, the runtime runs the
plugin on the host, where the image's Python does not exist, so the init container installs
:func:`host_wrapper` (``stockade k8s cni-install DIR``): it enters the running node agent's mount
namespace (the PID the agent writes to its pidfile; ``hostPID`` makes it a host PID) and runs the
plugin there, with the image's Python and ``nft``. While no node agent runs, ``ADD`` fails - the
runtime does not start the pod and retries, fail closed - and every other command succeeds (a pod
can still be torn down). The ruleset allows loopback and replies only; nothing is parsed from the
pod into it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stockade.backends.nftables.render import validate_table
from stockade.errors import StockadeError

SUPPORTED = ["0.4.0", "1.0.0", "1.1.0"]


def default_deny(table: str) -> str:
    """The nftables script: replace ``table`` by one that drops all but loopback and replies."""
    t = validate_table(table)
    chains = []
    for name, hook, iface in (("inbound", "input", "iif"), ("outbound", "output", "oif"),
                              ("forward", "forward", "iif")):
        chains.append(f"  chain {name} {{\n    type filter hook {hook} priority filter; policy drop;\n"
                      f"    {iface} \"lo\" accept\n    ct state established,related accept\n  }}\n")
    return f"table inet {t}\ndelete table inet {t}\ntable inet {t} {{\n{''.join(chains)}}}\n"


def _cni_args(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k] = v
    return out


class CniError(StockadeError):
    pass


def run(env: Mapping[str, str], stdin: str) -> str:
    """One CNI call; returns what to print. Raises CniError (printed as a CNI error)."""
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return json.dumps({"cniVersion": SUPPORTED[-1], "supportedVersions": SUPPORTED})
    try:
        conf: dict[str, Any] = json.loads(stdin or "{}")
    except ValueError as exc:
        raise CniError(f"network configuration is not JSON: {exc}") from None
    if command in ("DEL", "CHECK", "GC", "STATUS"):
        return ""
    if command != "ADD":
        raise CniError(f"unknown CNI_COMMAND {command[:20]!r}")
    netns = env.get("CNI_NETNS", "")
    if not netns.startswith("/") or ".." in netns:
        raise CniError("CNI_NETNS must be an absolute path")
    namespace = _cni_args(env.get("CNI_ARGS", "")).get("K8S_POD_NAMESPACE", "")
    except_ns = conf.get("exceptNamespaces") or []
    if not (isinstance(except_ns, list) and namespace in except_ns):
        script = default_deny(str(conf.get("table") or "stockade"))
        r = subprocess.run(["nsenter", f"--net={netns}", "nft", "-f", "-"], input=script, text=True,
                           capture_output=True, check=False)
        if r.returncode != 0:
            raise CniError(f"default-deny in {netns}: {r.stderr.strip()[:300]}")
    prev = conf.get("prevResult") or {}
    return json.dumps({**prev, "cniVersion": conf.get("cniVersion", SUPPORTED[-1])})


PLUGIN_NAME = "stockade-default-deny"
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]+")


def host_wrapper(pidfile: str, python: str = "/opt/stockade/bin/python") -> str:
    """The host-side plugin executable: run this module inside the node agent's mount namespace."""
    for what, path in (("pidfile", pidfile), ("python", python)):
        if not _SAFE_PATH.fullmatch(path) or ".." in path.split("/"):
            raise CniError(f"{what}: an absolute path of [A-Za-z0-9._/-]")
    versions = json.dumps({"cniVersion": SUPPORTED[-1], "supportedVersions": SUPPORTED})
    error = json.dumps({"cniVersion": SUPPORTED[-1], "code": 999, "msg": PLUGIN_NAME,
                        "details": "the Stockade node agent is not running on this node"})
    return (
        "#!/bin/sh\n"
        f"# {PLUGIN_NAME}: installed by the Stockade node agent's init container (stockade.k8s.cni)\n"
        f"pid=$(cat {pidfile} 2>/dev/null)\n"
        'case "$pid" in ""|*[!0-9]*) pid=0 ;; esac\n'
        f'if [ "$pid" -gt 0 ] && [ -x "/proc/$pid/root{python}" ]; then\n'
        f'  exec nsenter "--mount=/proc/$pid/ns/mnt" -- {python} -m stockade.k8s.cni\n'
        "fi\n"
        'case "$CNI_COMMAND" in\n'
        f"  ADD) echo '{error}'; exit 1 ;;\n"
        f"  VERSION) echo '{versions}' ;;\n"
        "esac\n"
        "exit 0\n"
    )


def install(directory: Path, pidfile: str) -> Path:
    """Write :func:`host_wrapper` into the node's CNI bin directory (atomically: a runtime may be running it)."""
    target = directory / PLUGIN_NAME
    part = directory / f".{PLUGIN_NAME}.part"
    part.write_text(host_wrapper(pidfile))
    part.chmod(0o755)
    part.replace(target)
    return target


def main() -> None:
    env = dict(os.environ)
    try:
        out = run(env, sys.stdin.read())
    except StockadeError as exc:
        print(json.dumps({"cniVersion": SUPPORTED[-1], "code": 999, "msg": "stockade-default-deny",
                          "details": str(exc)}))
        sys.exit(1)
    if out:
        print(out)


if __name__ == "__main__":
    main()


