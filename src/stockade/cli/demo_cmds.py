"""``stockade demo``: the whole product on the bundled example estate, on the embedded default.

1. Offline: validate and compile the example, explain a few connections (reference evaluator).
2. Control plane: start a real controller (SQLite in a fresh data dir, TLS with its own CA),
   load the example through the REST API as policy-as-code, provision it as version 1.
3. Enforcement (when run as root with nftables): bring the estate up in network namespaces with
   a real ``stockade agent`` in each workload's namespace (enrolled with an activation code, as a
   real host is); the agents pull and enforce their policy and report what their NFLOG groups see,
   so every one of the probes (every pair, every service port) reaches the controller's map and
   flow Explorer with its verdict and deciding rule. The "moonshot" is timed: from the command's
   start to the enforced label policy seen on the map.
4. Keep serving (console and API, with the lab and its agents alive) until Ctrl-C, unless ``--no-serve``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from stockade.cli import main
from stockade.cli.controller_cmds import GRACEFUL_SHUTDOWN_S
from stockade.cli.policy_cmds import load, run_demo, run_or_exit
from stockade.model.policy import Policy
from stockade.paths import example_estate

IP_FREEBIND = 15  # linux/in.h: bind an address that is not (yet) on any interface
CONVERGE_TIMEOUT = 180.0
FLOWS_TIMEOUT = 120.0


def _listen(host: str, port: int, *, freebind: bool = False, hint: str = "") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:  # the lab's controller address (IPv4) appears with the lab, after the controller starts
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def _policy_yaml(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.y*ml") if not p.name.startswith("."))
    return "\n---\n".join(f.read_text() for f in files)


class _ServerThread(threading.Thread):
    """uvicorn in a background thread (it installs no signal handlers off the main thread), on bound sockets."""

    def __init__(self, app: Any, sockets: list[socket.socket], ssl_files: tuple[str, str] | None) -> None:
        super().__init__(daemon=True, name="stockade-demo-controller")
        import uvicorn

        kwargs: dict[str, Any] = {}
        if ssl_files is not None:
            kwargs = {"ssl_certfile": ssl_files[0], "ssl_keyfile": ssl_files[1]}
        self.sockets = sockets
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", proxy_headers=False,
                                                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **kwargs))

    def run(self) -> None:
        self.server.run(sockets=self.sockets)

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.is_alive() or time.monotonic() > deadline:
                raise click.ClickException("the controller did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.join(timeout=10)
        for s in self.sockets:
            s.close()


def _api(base: str, ca: Path | None) -> Any:
    import httpx

    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca is not None else True
    # a session cookie authenticates this client: its changes must name the controller's origin (CSRF rule)
    return httpx.Client(base_url=base + "/api/v1", verify=verify, timeout=60, headers={"Origin": base})


def _check(response: Any, what: str) -> Any:
    if response.status_code >= 400:
        raise click.ClickException(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json() if response.content else None


def _lab_possible() -> str | None:
    """Why the kernel lab cannot run here, or None."""
    if os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None:
        return "needs root, iproute2 and nftables: run `sudo stockade demo`"
    return None


def _lab_controller(policy: Policy) -> str | None:
    """The IPv4 address the estate's failsafe lets agents reach the controller on, if it has one."""
    for net in policy.failsafe.controller:
        if net.num_addresses == 1 and net.version == 4:
            return str(net.network_address)
    return None


def _run_lab_without_agents(policy_dir: Path) -> None:
    """The estate enforced by the backends directly (a policy without a controller address)."""
    from stockade.lab.demo import OFFICE_CLIENT, controller_hosts
    from stockade.lab.demo import run_demo as run_lab_demo
    from stockade.lab.estate import registry_backend

    policy = load(policy_dir)
    report = run_or_exit(
        lambda: run_lab_demo(
            policy,
            unmanaged=[OFFICE_CLIENT, *controller_hosts(policy)],
            backend=registry_backend("nftables", table="stockade"),
        )
    )
    run = report.run
    allowed = sum(1 for c in run.checks if c.result.succeeded)
    click.echo(
        f"lab: {len(policy.workloads)} workloads enforced by nftables in network namespaces; "
        f"{len(run.checks)} real probes (TCP/UDP/ICMP, v4+v6): {allowed} connected, "
        f"{len(run.checks) - allowed} blocked; {len(run.disagreements)} disagreements with the evaluator\n"
        "lab: no agents (the policy's settings name no controller address), so the map stays empty"
    )


def _agent_takes_code_argument() -> bool:
    """True for an agent that still takes ``--activation-code`` (before it read $STOCKADE_ACTIVATION_CODE)."""
    from stockade.agent import main as agent_main

    return not hasattr(agent_main, "CODE_ENV")


def _wait(what: str, predicate: Callable[[], bool], timeout: float, explain: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what} (after {timeout:.0f} s)\n{explain()}")
        time.sleep(0.2)


def _map_mix(m: dict[str, Any]) -> tuple[int, int, int]:
    edges = m.get("edges", [])
    return (sum(e["allowed"] for e in edges), sum(e["potentially_blocked"] for e in edges),
            sum(e["blocked"] for e in edges))


@contextlib.contextmanager
def _lab_with_agents(policy_dir: Path, api: Any, controller_url: str, ca: Path | None, data: Path,
                     started: float) -> Iterator[None]:
    """The estate in namespaces, a real agent per workload, probed; the flows on the map. Stays up while open."""
    from stockade.lab.demo import OFFICE_CLIENT, failsafe_ports
    from stockade.lab.estate import EstateLab, PortPlan, hosts_for_policy, plan_probes, service_ports
    from stockade.lab.fleet import AgentFleet, AgentSpec, ControllerLink

    policy = load(policy_dir)
    plan = service_ports(policy)
    plan = PortPlan(tuple(sorted({*plan.tcp, *failsafe_ports(policy)})), plan.udp, plan.icmp_echo)
    hosts = hosts_for_policy(policy, tcp_ports=plan.tcp, udp_ports=plan.udp, unmanaged=[OFFICE_CLIENT])
    names = [w.name for w in policy.workloads]
    with ExitStack() as stack:
        estate = stack.enter_context(run_or_exit(lambda: EstateLab(hosts)))
        link = run_or_exit(lambda: ControllerLink(estate.lab, [n.network_address for n in policy.failsafe.controller
                                                               if n.num_addresses == 1]))
        stack.callback(link.remove)
        _check(api.post("/pairing-profiles", json={"name": "demo-lab", "labels": {}, "mode": "full"}),
               "create the pairing profile")
        specs = [AgentSpec(n, _check(api.post("/pairing-profiles/demo-lab/codes", json={"workload": n}),
                                     f"activation code for {n}")["code"]) for n in names]
        fleet = AgentFleet(estate.lab, controller_url, ca, data / "agents", specs,
                           code_argument=_agent_takes_code_argument())
        stack.enter_context(fleet)

        def converged() -> bool:
            dead = fleet.dead()
            if dead:
                host, rc = next(iter(dead.items()))
                raise click.ClickException(f"the agent of {host} exited ({rc}):\n{fleet.log_tail(host)}")
            agents = {a["workload"]: a for a in _check(api.get("/agents"), "list agents") if not a["revoked"]}
            return all(n in agents and agents[n]["converged"] and agents[n]["applied_revision"] > 0 for n in names)

        _wait("the agents did not enrol and converge", converged, CONVERGE_TIMEOUT,
              lambda: "\n".join(f"--- {n}\n{fleet.log_tail(n, 600)}" for n in names))
        enforced = time.monotonic() - started
        click.echo(f"lab: {len(names)} agents enrolled (one activation code each) and enforcing their policy "
                   f"with nftables in network namespaces, {enforced:.1f} s after the start")

        probes = plan_probes(hosts, plan)
        run = estate.check(policy, probes)
        allowed = sum(1 for c in run.checks if c.result.succeeded)
        click.echo(f"lab: {len(run.checks)} real probes (TCP/UDP/ICMP, v4+v6): {allowed} connected, "
                   f"{len(run.checks) - allowed} blocked; {len(run.disagreements)} disagreements with the evaluator")
        for c in run.disagreements[:10]:
            click.echo(f"  DISAGREE {c.describe()}")

        seen: dict[str, Any] = {}

        def on_map() -> bool:
            m = _check(api.get("/flows/map"), "read the map")
            mix = _map_mix(m)
            seen["map"], seen["at"] = m, time.monotonic()
            return mix[0] > 0 and mix[1] + mix[2] > 0

        _wait("the lab's flows did not reach the map", on_map, FLOWS_TIMEOUT, lambda: "no allowed+blocked edges")
        moonshot = seen["at"] - started

        def records() -> int:
            return sum(s["records"] for s in _check(api.get("/flows/stats"), "flow stats"))

        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + FLOWS_TIMEOUT
        while time.monotonic() < deadline:  # the agents upload every 2 s: wait until nothing new arrives
            now = records()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 4.5:
                break
            time.sleep(0.5)
        m = _check(api.get("/flows/map"), "read the map")
        a, pb, b = _map_mix(m)
        groups = [n for n in m["nodes"] if n["kind"] == "app-group"]
        click.echo(f"map: {len(groups)} app groups, {len(m['nodes']) - len(groups)} other peers, {len(m['edges'])} "
                   f"edges ({a} allowed, {pb} potentially blocked, {b} blocked links)")
        counts = _explorer_counts(api)
        click.echo(f"Explorer: {sum(counts.values())} flows reported by the agents (" +
                   ", ".join(f"{n} {v}" for v, n in sorted(counts.items())) + "), each with its deciding rule")
        click.echo(f"moonshot: fresh controller -> label policy enforced on {len(names)} hosts -> seen on the map "
                   f"in {moonshot:.1f} s")
        sys.stdout.flush()
        yield


def _explorer_counts(api: Any, pages: int = 50) -> dict[str, int]:
    """Flows in the Explorer per verdict (as the Explorer lists them, page by page)."""
    counts: dict[str, int] = {}
    cursor: str | None = None
    for _ in range(pages):
        page = _check(api.get("/flows", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}), "list flows")
        for f in page["items"]:
            counts[f["verdict"]] = counts.get(f["verdict"], 0) + 1
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return counts


def _ipv(host: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    return False


@main.command()
@click.option("--policy", "path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Policy dir (default: the bundled example estate).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Controller data dir (default: a fresh temporary directory).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8443, show_default=True, help="0 picks a free port.")
@click.option("--insecure-http", is_flag=True, help="Serve plain HTTP instead of TLS.")
@click.option("--lab/--no-lab", default=True, show_default=True,
              help="Enforce the estate in network namespaces with real agents and probe it (root only).")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Keep the controller (and the lab) running until Ctrl-C.")
def demo(path: Path | None, data_dir: Path | None, host: str, port: int, insecure_http: bool,
         lab: bool, serve: bool) -> None:
    """Run the demo on the bundled example estate (controller, API, console, and the kernel lab as root)."""
    from stockade.controller.app import create_app
    from stockade.controller.context import ControllerSettings
    from stockade.controller.tls import ensure_tls

    started = time.monotonic()
    policy_dir = path if path is not None else run_or_exit(example_estate)
    click.echo("== 1. the policy, compiled and explained offline ==")
    click.echo(run_or_exit(lambda: run_demo(policy_dir)))
    policy = load(policy_dir)
    no_lab = _lab_possible() if lab else "--no-lab"
    lab_addr = _lab_controller(policy) if no_lab is None else None
    lab_port = policy.failsafe.controller_port

    click.echo("\n== 2. the controller, loaded through its REST API ==")
    data = data_dir if data_dir is not None else Path(tempfile.mkdtemp(prefix="stockade-demo-"))
    settings = ControllerSettings.for_data_dir(data, secure_cookies=not insecure_http)
    app = create_app(settings)
    credential = app.state.controller.first_run_credential
    sockets = [_listen(host, port)]
    port = int(sockets[0].getsockname()[1])
    if lab_addr is not None and not (lab_addr == host and lab_port == port):
        sockets.append(_listen(lab_addr, lab_port, freebind=True,
                               hint=" (the estate's controller address for the lab: is another lab or demo running? "
                                    "Stop it, or use --no-lab)"))
    scheme = "http" if insecure_http else "https"
    ca: Path | None = None
    ssl_files = None
    if not insecure_http:
        names = tuple(dict.fromkeys(n for n in (host, lab_addr) if n is not None))
        files = ensure_tls(data / "tls", names)
        ca = files.ca_cert
        ssl_files = (str(files.server_cert), str(files.server_key))
    base = f"{scheme}://{f'[{host}]' if ':' in host and _ipv(host) else host}:{port}"
    server = _ServerThread(app, sockets, ssl_files)
    server.start()
    try:
        server.wait_started()
        with _api(base, ca) as api, ExitStack() as lab_stack:
            if credential is None:
                raise click.ClickException(f"{data} already has an owner: use a fresh --data-dir")
            user, password = credential
            _check(api.post("/auth/login", json={"username": user, "password": password}), "login")
            yaml_body = _policy_yaml(policy_dir)
            headers = {"content-type": "application/yaml"}
            result = _check(api.put("/policy/draft", content=yaml_body, headers=headers), "import the policy")
            version = _check(api.post("/policy/provision", json={"message": "demo: the example estate"}), "provision")
            workloads = _check(api.get("/workloads", params={"limit": 500}), "list workloads")
            changes = len(result.get("draft_changes", [])) + len(result.get("inventory_changes", []))
            count = len(workloads.get("items", [])) if isinstance(workloads, dict) else len(workloads)
            click.echo(f"imported {changes} objects; provisioned version {version.get('number')}; {count} workloads")
            click.echo(f"data dir: {data} (SQLite, WAL)")
            if ca is not None:
                click.echo(f"CA:       {ca}")
            click.echo(f"Console:  {base}/   (log in as {user!r} with password {password})")
            click.echo(f"API:      {base}/api/v1   OpenAPI: {base}/api/v1/openapi.json")

            if lab:
                click.echo("\n== 3. enforcement in the kernel lab, by real agents ==")
                if no_lab is not None:
                    click.echo(f"lab: skipped ({no_lab})")
                elif lab_addr is None:
                    _run_lab_without_agents(policy_dir)
                else:
                    lab_stack.enter_context(_lab_with_agents(policy_dir, api, f"{scheme}://{lab_addr}:{lab_port}",
                                                             ca, data, started))
                    click.echo(f"Map:      {base}/#/map   Explorer: {base}/#/explorer")
            if serve:
                click.echo("\nServing; press Ctrl-C to stop.")
                sys.stdout.flush()
                while server.is_alive():
                    server.join(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
