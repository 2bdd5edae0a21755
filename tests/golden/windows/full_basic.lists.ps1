# Stockade Windows Firewall policy: workload web-1, mode full
# peers: address-lists; rules: 5; keywords: 0
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
    # ruleset/shop/0
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade ruleset/shop/0 #0004' -Description 'ruleset/shop/0' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('80') -RemoteAddress @('10.0.0.11-10.0.0.13', 'fd00::11') | Out-Null
    # ruleset/shop/1
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005" -Group $StockadeGroup -DisplayName 'Stockade ruleset/shop/1 #0005' -Description 'ruleset/shop/1' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol TCP -RemotePort @('5432') -RemoteAddress @('10.0.1.20', 'fd00:1::20') | Out-Null
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
