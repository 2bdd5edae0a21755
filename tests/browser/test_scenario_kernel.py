"""The seed's example of security taking too long, done in the console and proven in the kernel.

"Give the dev team access to the new dev environment": the new dev environment is two hosts
enrolled with an activation code (``role=web`` and ``role=db``, ``app=shop, env=dev``, full
enforcement) running real ``stockade agent`` processes in lab namespaces; the dev team is the
``dev-team`` IP list (their desktops, unmanaged). In the console: a new ruleset, the scope and
the rule picked from labels and that IP list, a service picked, provision with a message. Then
real TCP probes in the lab: the desktops reach the web server on https, and nothing else opened
(not the database, not from elsewhere); every probe matches the reference evaluator over the
controller's active policy.

Needs root, ``ip`` and ``nft`` (marked ``kernel``) and chromium (marked ``browser``). The lab
uses its own subnet (10.71.0.0/24, fd71::/64) so it never meets the e2e tests' 10.70.0.0/24.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from stockade.evaluator import Evaluator, Verdict
from stockade.lab import HostSpec, Lab, Probe, ProbeKind, probe_matrix
from stockade.lab.estate import evaluate_probe
from stockade.policyfile import load_documents
from tests.browser.harness import free_port, pick
from tests.browser.test_console import provision_in_console
from tests.e2e.harness import AgentProcess, Api, ControllerLink, ControllerProcess, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.kernel]

A = ipaddress.ip_address
CONTROLLER_V4, CONTROLLER_V6 = "10.71.0.1", "fd71::1"
WEB = ("web-newdev-1", (A("10.71.0.11"), A("fd71::11")))
DB = ("db-newdev-1", (A("10.71.0.21"), A("fd71::21")))
DESK = ("desk-1", (A("10.71.0.200"), A("fd71::c8")))  # a dev team desktop (in dev-team)
OTHER = ("other-1", (A("10.71.0.100"), A("fd71::64")))  # someone else
TCP_PORTS = (443, 5432)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the kernel lab needs root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the kernel lab needs {tool!r}"
    return None


@dataclass
class World:
    lab: Lab
    api: Api
    controller: ControllerProcess
    agents: list[AgentProcess]

    def converged(self) -> bool:
        return self.api.converged([WEB[0], DB[0]])

    def disagreements(self) -> list[str]:
        evaluator = Evaluator(load_documents(self.api.active_policy_yaml(), "controller"))
        pairs = [(n, s.addresses) for n, s in self.lab.hosts.items()]
        results = self.lab.probe(probe_matrix(pairs, tcp_ports=TCP_PORTS), timeout=0.5)
        return [f"{r.probe}: real {r.outcome.value}, evaluator {evaluate_probe(evaluator, r.probe).verdict.value}"
                for r in results if r.succeeded != (evaluate_probe(evaluator, r.probe).verdict is not Verdict.BLOCKED)]

    def reaches(self, src: tuple[str, Any], dst: tuple[str, Any], port: int) -> list[bool]:
        probes = [Probe(src[0], dst[0], ProbeKind.TCP, s, d, port)
                  for s, d in zip(src[1], dst[1], strict=True)]  # v4 and v6
        return [r.succeeded for r in self.lab.probe(probes, timeout=0.5)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("scenario")
    specs = [HostSpec(name, addrs, TCP_PORTS) for name, addrs in (WEB, DB, DESK, OTHER)]
    port = free_port()
    with Lab(specs) as lab:
        link = ControllerLink(lab, f"{CONTROLLER_V4}/24", f"{CONTROLLER_V6}/64")
        controller = ControllerProcess(tmp / "controller", CONTROLLER_V4, port, tmp / "controller.log")
        agents: list[AgentProcess] = []
        try:
            controller.start()
            api = Api(controller.url, controller.first_run["user"], controller.first_run["password"],
                      controller.ca_cert)
            api.ok("POST", "/failsafe", 201, json={"name": "default", "controller_port": port,
                                                   "controller": [f"{CONTROLLER_V4}/32", f"{CONTROLLER_V6}/128"]})
            for name, ports in (("https", ["443/tcp"]), ("postgres", ["5432/tcp"])):
                api.ok("POST", "/services", 201, json={"name": name, "ports": ports})
            api.ok("POST", "/ip-lists", 201, json={"name": "dev-team", "include": ["10.71.0.192/26", "fd71::c0/122"],
                                                   "description": "the dev team's desktops"})
            api.ok("POST", "/rulesets", 201, json={
                "name": "shop-dev-tiers", "scope": [{"labels": {"app": "shop", "env": "dev"}}],
                "rules": [{"consumers": [{"labels": {"role": "web"}}], "providers": [{"labels": {"role": "db"}}],
                           "services": ["postgres"]}]})
            api.ok("POST", "/policy/provision", 201, json={"message": "the new dev environment's own tiers"})
            for (name, _addrs), role in ((WEB, "web"), (DB, "db")):
                code = api.activation_code(f"new-dev-{role}", {"role": role, "app": "shop", "env": "dev"}, "full")
                agent = AgentProcess(name, lab.netns(name), tmp / "state" / name, controller.url, code,
                                     tmp / f"agent-{name}.log", ca_cert=controller.ca_cert)
                agents.append(agent)
                agent.start()
            w = World(lab, api, controller, agents)
            took = wait_for(w.converged, 60.0, 0.1)
            assert took is not None, "agents did not converge\n" + "\n".join(
                a.log_tail(1500) for a in agents) + controller.log_tail()
            yield w
        finally:
            for a in agents:
                a.stop()
            controller.kill()
            link.remove()


def test_dev_team_gets_the_new_dev_environment_in_a_handful_of_clicks(world: World, browser: Any,
                                                                     screenshots: Path) -> None:
    # before: enforced, and the dev team is shut out
    assert world.reaches(DESK, WEB, 443) == [False, False]
    assert world.reaches(WEB, DB, 5432) == [True, True]
    assert world.disagreements() == []
    revision_before = world.api.agents()[WEB[0]]["applied_revision"]

    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=world.controller.url,
                              ignore_https_errors=True)  # the controller's own CA
    page = ctx.new_page()
    try:
        page.goto("/")
        page.get_by_label("Username").fill(world.controller.first_run["user"])
        page.get_by_label("Password").fill(world.controller.first_run["password"])
        page.get_by_role("button", name="Log in").click()
        # the clicks: Rulesets -> New ruleset -> name, scope, dev team, web, https -> Create -> Provision
        page.get_by_role("link", name="Rulesets", exact=True).click()
        page.get_by_role("link", name="New ruleset").click()
        page.get_by_label("Name", exact=True).fill("dev-team-access")
        scope = page.get_by_role("combobox", name="Scope", exact=True)
        pick(page, scope, "app=shop", "label:app=shop")
        pick(page, scope, "env=dev", "label:env=dev")
        rule = page.locator(".rule-card")
        rule.locator(".selector-row").first.get_by_role("combobox", name="Selector 1 kind").select_option("ip_list")
        pick(page, page.get_by_role("combobox", name="Consumers", exact=True), "dev", "iplist:dev-team")
        page.get_by_label("Where consumers may be").select_option("global")
        pick(page, page.get_by_role("combobox", name="Providers", exact=True), "role=web", "label:role=web")
        pick(page, page.get_by_role("combobox", name="Services", exact=True), "https", "https")
        page.get_by_role("button", name="Create in draft").click()
        page.get_by_role("link", name="Review the draft and provision →").click()
        expect(page.locator('[data-change="ruleset:dev-team-access"]')).to_be_visible()
        page.get_by_label("Message").fill("the dev team may reach the new dev environment (https)")
        provision_in_console(page)
        expect(page.locator("[data-role=provisioned]")).to_contain_text(WEB[0])
        page.screenshot(path=str(screenshots / "scenario-provisioned.png"), full_page=True)
    finally:
        ctx.close()

    # the agents apply it; real connections prove it
    took = wait_for(lambda: world.converged() and world.api.agents()[WEB[0]]["applied_revision"] > revision_before,
                    30.0, 0.1)
    assert took is not None, "the web host did not apply the new policy"
    ok = wait_for(lambda: world.reaches(DESK, WEB, 443) == [True, True], 10.0, 0.2)
    assert ok is not None, "the dev team's desktop still cannot reach the web server"
    assert world.reaches(DESK, DB, 5432) == [False, False]  # not the database
    assert world.reaches(OTHER, WEB, 443) == [False, False]  # not from outside the dev team
    assert world.reaches(WEB, DB, 5432) == [True, True]  # the tiers still talk
    assert world.disagreements() == []
