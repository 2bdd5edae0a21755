"""PowerShell text for the Windows Firewall backend (NetSecurity module), from a WindowsPlan.

Scripts run as ``powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File``.
The apply script is all-or-nothing: it creates a new *generation* of rules and keywords
(names ``stk-<generation>-<n>`` in group ``Stockade``, keywords ``stockade-<generation>-<peer>``,
the generation a fresh random token), sets the profile defaults, and only then removes every
older Stockade rule and keyword. If anything fails, the catch block removes the new
generation and rethrows: the previous policy stays in force. Nothing outside the group and
the ``stockade-`` keywords is ever removed.

Quoting: every value that is not generated here is written as a single-quoted PowerShell
string by :func:`ps_quote` (quote characters doubled, typographic single quotes included,
control characters replaced), or is an int/IP address/validated name; comments go through
:func:`safe_comment`. Rule ids and workload names therefore never reach the parser as code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from stockade.backends.windows.model import (
    KEYWORD_PREFIX,
    OTHER_PROTOCOL_RANGES,
    RULE_GROUP,
    RULE_PREFIX,
    PeerMode,
    RemoteKind,
    WinDirection,
    WindowsPlan,
    WinKeyword,
    WinProtocol,
    WinRule,
)
from stockade.model.addresses import Range

_QUOTES = "'\u2018\u2019\u201a\u201b"  # PowerShell treats all of these as single quotes
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_COMMENT_SAFE_RE = re.compile(r"[^A-Za-z0-9_.:/@=+\- ]")


def ps_quote(text: str) -> str:
    """``text`` as a single-quoted PowerShell string literal that cannot end early."""
    text = _CONTROL_RE.sub("?", text)
    for q in _QUOTES:
        text = text.replace(q, "'")
    return "'" + text.replace("'", "''") + "'"


def safe_comment(text: str) -> str:
    return _COMMENT_SAFE_RE.sub("?", text)[:120]


def _ints(ranges: Iterable[Range]) -> str:
    """``@(8, 13, (20..30))``: an array expression of ints (ranges of three or more as ``a..b``)."""
    parts: list[str] = []
    for lo, hi in ranges:
        if hi - lo >= 2:
            parts.append(f"({lo}..{hi})")
        else:
            parts.extend(str(v) for v in range(lo, hi + 1))
    if len(parts) == 1:
        return f"@({parts[0]})"
    return "@(" + " + ".join(p if p.startswith("(") else f"@({p})" for p in parts) + ")"


def _ports(ranges: Iterable[Range]) -> str:
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]
    return "@(" + ", ".join(ps_quote(i) for i in items) + ")"


_HEADER = f"""$ErrorActionPreference = 'Stop'
$StockadeGroup = {ps_quote(RULE_GROUP)}
$StockadeKeywordPrefix = {ps_quote(KEYWORD_PREFIX)}
$StockadeRulePrefix = {ps_quote(RULE_PREFIX)}
$StockadeHasKeywords = [bool](Get-Command -Name 'Get-NetFirewallDynamicKeywordAddress' -ErrorAction SilentlyContinue)

function Remove-StockadeObjects([string]$Generation, [bool]$Keep) {{
    # Keep $true: remove every Stockade generation except $Generation; $false: remove only it.
    $rulePrefix = $StockadeRulePrefix + $Generation + '-'
    $rules = @(Get-NetFirewallRule -Group $StockadeGroup -ErrorAction SilentlyContinue)
    foreach ($r in $rules) {{
        if ($r.Name.StartsWith($rulePrefix) -ne $Keep) {{ Remove-NetFirewallRule -Name $r.Name }}
    }}
    if ($StockadeHasKeywords) {{
        $keywordPrefix = $StockadeKeywordPrefix + $Generation + '-'
        foreach ($k in @(Get-NetFirewallDynamicKeywordAddress -All -ErrorAction SilentlyContinue)) {{
            if (-not $k.Keyword.StartsWith($StockadeKeywordPrefix)) {{ continue }}
            if ($k.Keyword.StartsWith($keywordPrefix) -ne $Keep) {{
                Remove-NetFirewallDynamicKeywordAddress -Id $k.Id
            }}
        }}
    }}
}}
"""

_KEYWORD_FUNCTION = """
function New-StockadeKeyword([string]$Name, [string]$Addresses) {
    $id = '{' + [guid]::NewGuid().ToString() + '}'
    $keyword = $StockadeKeywordPrefix + $StockadeGeneration + '-' + $Name
    New-NetFirewallDynamicKeywordAddress -Id $id -Keyword $keyword -Addresses $Addresses | Out-Null
    return $id
}
"""


def _rule_lines(rule: WinRule) -> list[str]:
    number = rule.name_suffix
    name = f'"$StockadeRulePrefix$StockadeGeneration-{number}"'
    args = [
        "-Group $StockadeGroup",
        f"-DisplayName {ps_quote(f'Stockade {rule.rule_id} #{number}')}",
        f"-Description {ps_quote(rule.rule_id)}",
        f"-Direction {rule.direction.value}",
        f"-Action {rule.action.value}",
        "-Profile Any",
        "-Enabled True",
    ]
    if rule.protocol is WinProtocol.OTHER:
        name = f'"$StockadeRulePrefix$StockadeGeneration-{number}-p$p"'
        args.append("-Protocol $p")
    else:
        args.append(f"-Protocol {rule.protocol.value}")
    if rule.ports:
        side = "-LocalPort" if rule.direction is WinDirection.INBOUND else "-RemotePort"
        args.append(f"{side} {_ports(rule.ports)}")
    if rule.icmp_types:
        args.append(f"-IcmpType {_ints(rule.icmp_types)}")
    remote = rule.remote
    if remote.kind is RemoteKind.KEYWORD:
        args.append(f"-RemoteDynamicKeywordAddresses $StockadeKeywords[{ps_quote(remote.keyword)}]")
    elif remote.kind is RemoteKind.LIST:
        args.append("-RemoteAddress @(" + ", ".join(ps_quote(a) for a in remote.addresses) + ")")
    call = f"New-NetFirewallRule -Name {name} " + " ".join(args) + " | Out-Null"
    if rule.protocol is WinProtocol.OTHER:
        return ["    foreach ($p in $StockadeOtherProtocols) {", f"        {call}", "    }"]
    return [f"    {call}"]


def _profile_line(plan: WindowsPlan) -> str:
    enabled = "" if not plan.present else " -Enabled True"
    log = (
        f" -LogAllowed {'True' if plan.log_allowed else 'False'} -LogBlocked {'True' if plan.log_blocked else 'False'}"
        if plan.present
        else " -LogAllowed NotConfigured -LogBlocked NotConfigured"
    )
    return (
        f"Set-NetFirewallProfile -All{enabled}"
        f" -DefaultInboundAction {plan.default_inbound.value}"
        f" -DefaultOutboundAction {plan.default_outbound.value}{log}"
    )


def apply_script(plan: WindowsPlan) -> str:
    """The script that installs ``plan`` atomically (idle: removes everything Stockade owns)."""
    out = [
        f"# Stockade Windows Firewall policy: workload {safe_comment(plan.workload)}, mode {plan.mode.value}",
        f"# peers: {plan.peer_mode.value}; rules: {len(plan.rules)}; keywords: {len(plan.keywords)}",
        _HEADER,
    ]
    if not plan.present:
        out.append("# generation '' matches none, so keeping it removes every Stockade rule and keyword")
        out.append("Remove-StockadeObjects -Generation '' -Keep $true")
        out.append(_profile_line(plan))
        return "\n".join(out) + "\n"
    out.append("$StockadeGeneration = [guid]::NewGuid().ToString('N').Substring(0, 12)")
    if any(r.protocol is WinProtocol.OTHER for r in plan.rules):
        out.append(f"$StockadeOtherProtocols = {_ints(OTHER_PROTOCOL_RANGES)}")
    if plan.peer_mode is PeerMode.DYNAMIC_KEYWORDS:
        out.append(_KEYWORD_FUNCTION)
    out.append("$StockadeKeywords = @{}")
    out.append("try {")
    for k in plan.keywords:
        out.append(
            f"    $StockadeKeywords[{ps_quote(k.name)}] = "
            f"New-StockadeKeyword -Name {ps_quote(k.name)} -Addresses {ps_quote(k.address_text())}"
        )
    for rule in plan.rules:
        out.append(f"    # {safe_comment(rule.rule_id)}")
        out.extend(_rule_lines(rule))
    out.append(f"    {_profile_line(plan)}")
    out.append("} catch {")
    out.append("    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false")
    out.append("    throw")
    out.append("}")
    out.append("Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true")
    return "\n".join(out) + "\n"


def remove_script() -> str:
    """Remove every Stockade rule and keyword and reset the profile defaults."""
    return (
        "# Stockade: remove everything Stockade installed\n"
        + _HEADER
        + "Remove-StockadeObjects -Generation '' -Keep $true\n"
        + "Set-NetFirewallProfile -All -DefaultInboundAction NotConfigured"
        + " -DefaultOutboundAction NotConfigured -LogAllowed NotConfigured -LogBlocked NotConfigured\n"
    )


def delta_script(keywords: Iterable[WinKeyword]) -> str:
    """Update the addresses of existing keywords in place (peer churn: no rule is touched).

    Every keyword is checked to exist exactly once before any is changed.
    """
    keywords = list(keywords)
    out = ["# Stockade: dynamic keyword address update", "$ErrorActionPreference = 'Stop'"]
    out.append("$all = @(Get-NetFirewallDynamicKeywordAddress -All)")
    out.append("$ids = @{}")
    for k in keywords:
        suffix = ps_quote("-" + k.name)
        prefix = ps_quote(KEYWORD_PREFIX)
        out.append(
            f"$found = @($all | Where-Object {{ $_.Keyword.StartsWith({prefix}) -and $_.Keyword.EndsWith({suffix}) }})"
        )
        out.append(f"if ($found.Count -ne 1) {{ throw {ps_quote(f'keyword {k.name} not found exactly once')} }}")
        out.append(f"$ids[{ps_quote(k.name)}] = $found[0].Id")
    for k in keywords:
        out.append(
            f"Update-NetFirewallDynamicKeywordAddress -Id $ids[{ps_quote(k.name)}] "
            f"-Addresses {ps_quote(k.address_text())} | Out-Null"
        )
    return "\n".join(out) + "\n"


def read_back_script() -> str:
    """Print Stockade's rules, keywords and the profile defaults as JSON (one document)."""
    return (
        _HEADER
        + """$rules = @(Get-NetFirewallRule -Group $StockadeGroup -ErrorAction SilentlyContinue | ForEach-Object {
    $port = $_ | Get-NetFirewallPortFilter
    $addr = $_ | Get-NetFirewallAddressFilter
    [ordered]@{
        Name = $_.Name; Description = $_.Description; Direction = [string]$_.Direction
        Action = [string]$_.Action; Enabled = [string]$_.Enabled; Protocol = [string]$port.Protocol
        LocalPort = @($port.LocalPort); RemotePort = @($port.RemotePort); IcmpType = @($port.IcmpType)
        RemoteAddress = @($addr.RemoteAddress); RemoteDynamicKeywordAddresses = @($addr.RemoteDynamicKeywordAddresses)
    }
})
$keywords = @()
if ($StockadeHasKeywords) {
    $keywords = @(Get-NetFirewallDynamicKeywordAddress -All |
        Where-Object { $_.Keyword.StartsWith($StockadeKeywordPrefix) } |
        ForEach-Object { [ordered]@{ Id = $_.Id; Keyword = $_.Keyword; Addresses = $_.Addresses } })
}
$profiles = @(Get-NetFirewallProfile | ForEach-Object {
    [ordered]@{ Name = $_.Name; DefaultInboundAction = [string]$_.DefaultInboundAction
                DefaultOutboundAction = [string]$_.DefaultOutboundAction }
})
[ordered]@{ rules = $rules; keywords = $keywords; profiles = $profiles } | ConvertTo-Json -Depth 5 -Compress
"""
    )
