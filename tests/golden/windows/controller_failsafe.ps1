# Stockade Windows Firewall policy: workload web-1, mode full
# peers: dynamic-keywords; rules: 5; keywords: 1
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

function New-StockadeKeyword([string]$Name, [string]$Addresses) {
    $id = '{' + [guid]::NewGuid().ToString() + '}'
    $keyword = $StockadeKeywordPrefix + $StockadeGeneration + '-' + $Name
    New-NetFirewallDynamicKeywordAddress -Id $id -Keyword $keyword -Addresses $Addresses | Out-Null
    return $id
}

$StockadeKeywords = @{}
try {
    $StockadeKeywords['pdb000000002'] = New-StockadeKeyword -Name 'pdb000000002' -Addresses '10.0.1.20,fd00:1::20'
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0001' -Description 'failsafe:nd' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0002" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0002' -Description 'failsafe:nd' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0003" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0003' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('22') | Out-Null
    # failsafe:controller
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade failsafe:controller #0004' -Description 'failsafe:controller' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol TCP -RemotePort @('9443') -RemoteAddress @('10.9.0.1-10.9.0.3', '10.10.0.0/16', 'fd00:ff::1') | Out-Null
    # ruleset/shop/1
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005" -Group $StockadeGroup -DisplayName 'Stockade ruleset/shop/1 #0005' -Description 'ruleset/shop/1' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol TCP -RemotePort @('5432') -RemoteDynamicKeywordAddresses $StockadeKeywords['pdb000000002'] | Out-Null
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
