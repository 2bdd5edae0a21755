# Stockade Windows Firewall policy: workload web-1, mode full
# peers: address-lists; rules: 7; keywords: 0
$ErrorActionPreference = 'Stop'
$StockadeGroup = 'Stockade'
$StockadeKeywordPrefix = 'stockade-'
$StockadeRulePrefix = 'stk-'
$StockadeHasKeywords = [bool](Get-Command -Name 'Get-NetFirewallDynamicKeywordAddress' -ErrorAction SilentlyContinue)

function Remove-StockadeObjects([string]$Generation, [bool]$Keep) {
    # Keep $true: remove every Stockade generation except $Generation; $false: remove only it.
    $rulePrefix = $StockadeRulePrefix + $Generation + '-'
    $rules = @(Get-NetFirewallRule -Group $StockadeGroup -ErrorAction SilentlyContinue)
    foreach ($r in $rules) {
        if ($r.Name.StartsWith($rulePrefix) -ne $Keep) { Remove-NetFirewallRule -Name $r.Name }
    }
    if ($StockadeHasKeywords) {
        $keywordPrefix = $StockadeKeywordPrefix + $Generation + '-'
        foreach ($k in @(Get-NetFirewallDynamicKeywordAddress -All -ErrorAction SilentlyContinue)) {
            if (-not $k.Keyword.StartsWith($StockadeKeywordPrefix)) { continue }
            if ($k.Keyword.StartsWith($keywordPrefix) -ne $Keep) {
                Remove-NetFirewallDynamicKeywordAddress -Id $k.Id
            }
        }
    }
}

$StockadeGeneration = [guid]::NewGuid().ToString('N').Substring(0, 12)
$StockadeKeywords = @{}
try {
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0001' -Description 'failsafe:nd' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0002" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0002' -Description 'failsafe:nd' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0003" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0003' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('22') | Out-Null
    # failsafe:controller
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade failsafe:controller #0004' -Description 'failsafe:controller' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol TCP -RemotePort @('8443') -RemoteAddress @('fd00:ff::1') | Out-Null
    # ruleset/v6/0
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005" -Group $StockadeGroup -DisplayName 'Stockade ruleset/v6/0 #0005' -Description 'ruleset/v6/0' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('80') -RemoteAddress @('fd00:2::1-fd00:2::2', 'fd00:3::/64') | Out-Null
    # ruleset/v6/0
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0006" -Group $StockadeGroup -DisplayName 'Stockade ruleset/v6/0 #0006' -Description 'ruleset/v6/0' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @(128) -RemoteAddress @('fd00:2::1-fd00:2::2', 'fd00:3::/64') | Out-Null
    # ruleset/v6/1
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0007" -Group $StockadeGroup -DisplayName 'Stockade ruleset/v6/1 #0007' -Description 'ruleset/v6/1' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol UDP -RemotePort @('53') -RemoteAddress @('fd00:2::1-fd00:2::2', 'fd00:3::/64') | Out-Null
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
