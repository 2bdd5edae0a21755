# Stockade Windows Firewall policy: workload web-1, mode selective
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
$StockadeOtherProtocols = @(@(0) + (2..5) + (7..16) + (18..57) + (59..255))

function New-StockadeKeyword([string]$Name, [string]$Addresses) {
    $id = '{' + [guid]::NewGuid().ToString() + '}'
    $keyword = $StockadeKeywordPrefix + $StockadeGeneration + '-' + $Name
    New-NetFirewallDynamicKeywordAddress -Id $id -Keyword $keyword -Addresses $Addresses | Out-Null
    return $id
}

$StockadeKeywords = @{}
try {
    $StockadeKeywords['pweb00000001'] = New-StockadeKeyword -Name 'pweb00000001' -Addresses '10.0.0.11-10.0.0.13,fd00::11'
    # deny/all-web
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade deny/all-web #0001' -Description 'deny/all-web' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol TCP -RemoteDynamicKeywordAddresses $StockadeKeywords['pweb00000001'] | Out-Null
    # deny/all-web
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0002" -Group $StockadeGroup -DisplayName 'Stockade deny/all-web #0002' -Description 'deny/all-web' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol UDP -RemoteDynamicKeywordAddresses $StockadeKeywords['pweb00000001'] | Out-Null
    # deny/all-web
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0003" -Group $StockadeGroup -DisplayName 'Stockade deny/all-web #0003' -Description 'deny/all-web' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol ICMPv4 -RemoteDynamicKeywordAddresses $StockadeKeywords['pweb00000001'] | Out-Null
    # deny/all-web
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade deny/all-web #0004' -Description 'deny/all-web' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((0..132) + (138..255)) -RemoteDynamicKeywordAddresses $StockadeKeywords['pweb00000001'] | Out-Null
    # deny/all-web
    foreach ($p in $StockadeOtherProtocols) {
        New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005-p$p" -Group $StockadeGroup -DisplayName 'Stockade deny/all-web #0005' -Description 'deny/all-web' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol $p -RemoteDynamicKeywordAddresses $StockadeKeywords['pweb00000001'] | Out-Null
    }
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Allow -DefaultOutboundAction Allow -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
