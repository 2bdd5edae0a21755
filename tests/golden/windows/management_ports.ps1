# Stockade Windows Firewall policy: workload web-1, mode full
# peers: dynamic-keywords; rules: 7; keywords: 1
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
    $StockadeKeywords['pweb00000001'] = New-StockadeKeyword -Name 'pweb00000001' -Addresses '10.0.0.11-10.0.0.13,fd00::11'
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0001' -Description 'failsafe:nd' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0002" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0002' -Description 'failsafe:nd' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0003" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0003' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('22', '2222-2223') | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0004' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol UDP -LocalPort @('161') | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0005' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv4 -IcmpType @(8) | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0006" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0006' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @(128) | Out-Null
    # ruleset/shop/0
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0007" -Group $StockadeGroup -DisplayName 'Stockade ruleset/shop/0 #0007' -Description 'ruleset/shop/0' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('80') -RemoteDynamicKeywordAddresses $StockadeKeywords['pweb00000001'] | Out-Null
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
