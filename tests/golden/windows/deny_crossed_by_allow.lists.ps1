# Stockade Windows Firewall policy: workload web-1, mode selective
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
$StockadeOtherProtocols = @(@(0) + (2..5) + (7..16) + (18..57) + (59..255))
$StockadeKeywords = @{}
try {
    # deny/corp-db
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-db #0001' -Description 'deny/corp-db' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol UDP -LocalPort @('3306') -RemoteAddress @('10.0.0.0/8', '172.16.0.0/12', 'fd00::/48') | Out-Null
    # deny/corp-db
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0002" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-db #0002' -Description 'deny/corp-db' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol TCP -LocalPort @('3306') -RemoteAddress @('10.0.0.0-10.0.0.10', '10.0.0.14-10.255.255.255', '172.16.0.0/12', 'fd00::-fd00::10', 'fd00::12-fd00::ffff:ffff:ffff:ffff:ffff') | Out-Null
    # deny/corp-out
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0003" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-out #0003' -Description 'deny/corp-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol TCP -RemoteAddress @('10.0.0.0/8', '172.16.0.0/12', 'fd00::/48') | Out-Null
    # deny/corp-out
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-out #0004' -Description 'deny/corp-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol UDP -RemoteAddress @('10.0.0.0/8', '172.16.0.0/12', 'fd00::/48') | Out-Null
    # deny/corp-out
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-out #0005' -Description 'deny/corp-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol ICMPv4 -RemoteAddress @('10.0.0.0/8', '172.16.0.0/12', 'fd00::/48') | Out-Null
    # deny/corp-out
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0006" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-out #0006' -Description 'deny/corp-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((0..132) + (138..255)) -RemoteAddress @('10.0.0.0/8', '172.16.0.0/12', 'fd00::/48') | Out-Null
    # deny/corp-out
    foreach ($p in $StockadeOtherProtocols) {
        New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0007-p$p" -Group $StockadeGroup -DisplayName 'Stockade deny/corp-out #0007' -Description 'deny/corp-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol $p -RemoteAddress @('10.0.0.0/8', '172.16.0.0/12', 'fd00::/48') | Out-Null
    }
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Allow -DefaultOutboundAction Allow -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
