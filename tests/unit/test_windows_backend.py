"""Windows Firewall backend: scripts parse with a real PowerShell grammar, hostile names stay
inside string literals, and the runner/deltas/read-back work against a fake executor."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.backends.setalgebra import PeerExpr
from stockade.backends.windows.backend import CommandResult, PowerShellRunner, WindowsFirewallBackend
from stockade.backends.windows.model import PeerMode, WinKeyword
from stockade.backends.windows.script import delta_script, ps_quote, read_back_script, remove_script
from stockade.compiler.ir import HostRule, SetDelta
from stockade.errors import ApplyError, RenderError
from stockade.model import Family
from tests.golden.nft_cases import ALLOW, CASES, DENY, FULL, IN, OUT, OVERRIDE, SELECTIVE, WEB, host, peer, tcp

tree_sitter = pytest.importorskip("tree_sitter")
tsp = pytest.importorskip("tree_sitter_powershell")
PARSER = tree_sitter.Parser(tree_sitter.Language(tsp.language()))

COMMANDS = {
    "Get-Command", "Get-NetFirewallRule", "Remove-NetFirewallRule", "Get-NetFirewallDynamicKeywordAddress",
    "Remove-NetFirewallDynamicKeywordAddress", "New-NetFirewallDynamicKeywordAddress", "Out-Null",
    "New-NetFirewallRule", "Set-NetFirewallProfile", "Remove-StockadeObjects", "New-StockadeKeyword",
    "Update-NetFirewallDynamicKeywordAddress", "Where-Object", "ForEach-Object", "Get-NetFirewallPortFilter",
    "Get-NetFirewallAddressFilter", "Get-NetFirewallProfile", "ConvertTo-Json",
}  # fmt: skip
RANGE_RE = re.compile(r"^\d+\.\.\d+$")
VARIABLES = {"$StockadeRulePrefix", "$StockadeGeneration", "$p"}  # the only ones inside "..." strings


def nodes(node: object) -> Iterator[object]:
    yield node
    for child in node.children:  # type: ignore[attr-defined]
        yield from nodes(child)


def parse_clean(text: str) -> object:
    tree = PARSER.parse(text.encode())
    bad = [n for n in nodes(tree.root_node) if n.type == "ERROR" or n.is_missing]  # type: ignore[attr-defined]
    assert not bad, f"PowerShell grammar rejects: {[(n.start_point, n.text[:80]) for n in bad]}"  # type: ignore[attr-defined]
    return tree.root_node


def check_structure(text: str) -> object:
    """Parse, then check every command is one we write and "..." strings hold only our variables."""
    root = parse_clean(text)
    for n in nodes(root):
        if n.type == "command_name":  # type: ignore[attr-defined]
            name = n.text.decode()  # type: ignore[attr-defined]
            # tree-sitter-powershell reads a range like (0..132) in statement position as a
            # command name; PowerShell itself parses it as a range expression (digits first)
            assert name in COMMANDS or RANGE_RE.match(name), name
        if n.type == "expandable_string_literal":  # type: ignore[attr-defined]
            body = n.text.decode()  # type: ignore[attr-defined]
            for var in (c for c in nodes(n) if c.type == "variable"):  # type: ignore[attr-defined]
                assert var.text.decode() in VARIABLES, body  # type: ignore[attr-defined]
            assert "$(" not in body and "`" not in body, body
    return root


@pytest.mark.parametrize("mode", list(PeerMode))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_rendering_parses(case: object, mode: PeerMode) -> None:
    text = WindowsFirewallBackend(mode).render(case.policy).to_text()  # type: ignore[attr-defined]
    check_structure(text)


def test_helper_scripts_parse() -> None:
    check_structure(remove_script())
    check_structure(read_back_script())
    keyword = WinKeyword("pweb00000001", PeerExpr("pweb00000001"), ("10.0.0.1", "10.0.0.2-10.0.0.9"))
    check_structure(delta_script([keyword]))


def test_grammar_rejects_broken_script() -> None:
    with pytest.raises(AssertionError):
        parse_clean("New-NetFirewallRule -Name 'a\n$x = @(\n")


HOSTILE = [
    "x'; Remove-Item -Recurse C:\\ ; 'EVIL1",
    "x\u2019; Stop-Computer; \u2018EVIL2",
    "x\"; $(Invoke-Expression EVIL3) \"",
    "x`n EVIL4 `$(whoami)",
    "x\n Remove-Item EVIL5\n#",
    "x'@\nEVIL6\n@'",
    "x\x00\x1b[31mEVIL7",
    "x\u2028EVIL8\u0085",
]


@pytest.mark.parametrize("payload", HOSTILE)
def test_hostile_names_stay_inside_string_literals(payload: str) -> None:
    marker = next(m for m in ("EVIL1", "EVIL2", "EVIL3", "EVIL4", "EVIL5", "EVIL6", "EVIL7", "EVIL8") if m in payload)
    hp = host(
        SELECTIVE,
        [
            HostRule(OVERRIDE, IN, f"deny/{payload}", WEB[0].name, (tcp(80),)),
            HostRule(ALLOW, IN, f"ruleset/{payload}/0", WEB[0].name, (tcp(443),)),
            HostRule(DENY, OUT, f"deny/{payload}-out", WEB[0].name, (tcp(25),)),
        ],
        [WEB],
    )
    hp = replace(hp, workload=f"web {payload}")
    for mode in PeerMode:
        for policy in (hp, replace(hp, mode=FULL)):
            text = WindowsFirewallBackend(mode).render(policy).to_text()
            root = check_structure(text)
            literal_spans = [
                (n.start_byte, n.end_byte)  # type: ignore[attr-defined]
                for n in nodes(root)
                if n.type in ("string_literal", "comment")  # type: ignore[attr-defined]
            ]
            data = text.encode()
            start = 0
            found = 0
            while (i := data.find(marker.encode(), start)) >= 0:
                assert any(lo <= i < hi for lo, hi in literal_spans), f"{marker} escaped at byte {i}"
                found += 1
                start = i + 1
            assert found, "the payload should appear (quoted) in the script"
            for n in nodes(root):
                if n.type == "string_literal":  # type: ignore[attr-defined]
                    assert n.text.startswith(b"'") or n.text.startswith(b'"')  # type: ignore[attr-defined]


def test_ps_quote_doubles_every_single_quote_form() -> None:
    assert ps_quote("a'b") == "'a''b'"
    assert ps_quote("a\u2019b\u2018c") == "'a''b''c'"
    assert ps_quote("a\nb\x00") == "'a?b?'"


def test_hostile_set_name_is_refused() -> None:
    evil = peer("p'; Remove-Item x; '")
    hp = host(FULL, [HostRule(ALLOW, IN, "ruleset/x/0", evil[0].name, (tcp(80),))], [evil])
    with pytest.raises(RenderError, match="not a valid Windows keyword name"):
        WindowsFirewallBackend().render(hp)


# ---- runner and backend against a fake executor ------------------------------------------


class FakePowerShell:
    """Records each run's argv and script; answers with canned results."""

    def __init__(self, results: list[CommandResult] | None = None) -> None:
        self.calls: list[tuple[list[str], str]] = []
        self.results = list(results or [])

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        path = Path(argv[-1])
        raw = path.read_bytes()
        assert raw.startswith(b"\xef\xbb\xbf"), "scripts are written UTF-8 with BOM"
        self.calls.append((list(argv), raw[3:].decode().replace("\r\n", "\n")))
        return self.results.pop(0) if self.results else CommandResult(0, "", "")


def test_runner_argv_and_cleanup() -> None:
    fake = FakePowerShell()
    PowerShellRunner(fake, powershell="C:\\pwsh\\powershell.exe").run("Write-Output 'hi'\n")
    argv, script = fake.calls[0]
    assert argv[:-1] == [
        "C:\\pwsh\\powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File",
    ]  # fmt: skip
    assert argv[-1].endswith(".ps1") and not Path(argv[-1]).exists()
    assert script == "Write-Output 'hi'\n"


def test_runner_failure_is_apply_error() -> None:
    fake = FakePowerShell([CommandResult(1, "", "New-NetFirewallRule : Access is denied")])
    with pytest.raises(ApplyError, match="Access is denied"):
        PowerShellRunner(fake).run("x\n")


def _case(name: str) -> object:
    return next(c for c in CASES if c.name == name).policy


def test_apply_then_delta_updates_only_changed_keywords() -> None:
    fake = FakePowerShell()
    backend = WindowsFirewallBackend(executor=fake)
    with pytest.raises(ApplyError, match="apply a full policy first"):
        backend.apply_delta((SetDelta(WEB[0].name, Family.V4, (ipaddress.ip_network("10.0.0.50/32"),), ()),))
    hp = _case("deny_crossed_by_allow")
    backend.apply(backend.render(hp))  # type: ignore[arg-type]
    assert "New-NetFirewallRule" in fake.calls[-1][1]
    delta = SetDelta(WEB[0].name, Family.V4, (ipaddress.ip_network("10.0.0.50/32"),), ())
    backend.apply_delta((delta,))
    script = fake.calls[-1][1]
    check_structure(script)
    assert "New-NetFirewallRule" not in script and "Remove-NetFirewallRule" not in script
    # WEB is only subtracted from CORP on 3306/tcp: that derived keyword changes, CORP's own does not
    assert script.count("Update-NetFirewallDynamicKeywordAddress") == 1
    assert "10.0.0.50" not in script and "10.0.0.49" in script  # 10.0.0.50 left the derived set
    # an unrelated delta changes nothing and runs nothing
    runs = len(fake.calls)
    backend.apply_delta((SetDelta(WEB[0].name, Family.V4, (), (ipaddress.ip_network("10.0.0.50/32"),)),))
    assert len(fake.calls) == runs + 1
    with pytest.raises(ApplyError, match="absent members"):
        backend.apply_delta((SetDelta(WEB[0].name, Family.V4, (), (ipaddress.ip_network("10.9.9.9/32"),)),))


def test_address_list_delta_reapplies_everything() -> None:
    fake = FakePowerShell()
    backend = WindowsFirewallBackend(PeerMode.ADDRESS_LISTS, executor=fake)
    backend.apply(backend.render(_case("full_basic")))  # type: ignore[arg-type]
    backend.apply_delta((SetDelta(WEB[0].name, Family.V4, (ipaddress.ip_network("10.0.0.50/32"),), ()),))
    script = fake.calls[-1][1]
    assert "New-NetFirewallRule" in script and "'10.0.0.50'" in script


def test_remove_touches_only_stockade_group() -> None:
    fake = FakePowerShell()
    WindowsFirewallBackend(executor=fake).remove()
    script = fake.calls[0][1]
    assert "Get-NetFirewallRule -Group $StockadeGroup" in script
    assert "$StockadeGroup = 'Stockade'" in script
    # the only removals: rules listed from the Stockade group, keywords with the stockade- prefix
    assert script.count("Remove-NetFirewallRule") == script.count("Remove-NetFirewallRule -Name $r.Name") == 1
    assert "$rules = @(Get-NetFirewallRule -Group $StockadeGroup" in script
    assert script.count("Remove-NetFirewallDynamicKeywordAddress") == 1
    guard = script.index("if (-not $k.Keyword.StartsWith($StockadeKeywordPrefix)) { continue }")
    assert guard < script.index("Remove-NetFirewallDynamicKeywordAddress")


def test_read_back_normalises_generation() -> None:
    doc = {
        "rules": [{"Name": "stk-abc-0001", "Description": "ruleset/shop/0", "Action": "Allow"}],
        "keywords": [{"Id": "{1}", "Keyword": "stockade-abc-pweb00000001", "Addresses": "10.0.0.11"}],
        "profiles": [{"Name": "Domain", "DefaultInboundAction": "Block", "DefaultOutboundAction": "Block"}],
    }
    fake = FakePowerShell([CommandResult(0, json.dumps(doc), "")])
    text = WindowsFirewallBackend(executor=fake).read_back()
    parsed = json.loads(text)
    assert parsed["keywords"][0]["Keyword"] == "pweb00000001" and "Name" not in parsed["rules"][0]
    empty = FakePowerShell([CommandResult(0, json.dumps({"rules": [], "keywords": [], "profiles": []}), "")])
    assert WindowsFirewallBackend(executor=empty).read_back() == ""
