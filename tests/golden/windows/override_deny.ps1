# Stockade Windows Firewall policy: workload web-1, mode full
# peers: dynamic-keywords; rules: 11; keywords: 2
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
    $StockadeKeywords['pbad00000003'] = New-StockadeKeyword -Name 'pbad00000003' -Addresses '192.0.2.0/24,2001:db8::/32'
    $StockadeKeywords['pcorp0000004'] = New-StockadeKeyword -Name 'pcorp0000004' -Addresses '10.0.0.0/8,172.16.0.0/12,fd00::/48'
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0001' -Description 'failsafe:nd' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:nd
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0002" -Group $StockadeGroup -DisplayName 'Stockade failsafe:nd #0002' -Description 'failsafe:nd' -Direction Outbound -Action Allow -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((133..137)) | Out-Null
    # failsafe:management
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0003" -Group $StockadeGroup -DisplayName 'Stockade failsafe:management #0003' -Description 'failsafe:management' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('22') | Out-Null
    # deny/quarantine
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0004" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine #0004' -Description 'deny/quarantine' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol TCP -LocalPort @('0-21', '23-65535') -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    # deny/quarantine
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0005" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine #0005' -Description 'deny/quarantine' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol UDP -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    # deny/quarantine
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0006" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine #0006' -Description 'deny/quarantine' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol ICMPv4 -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    # deny/quarantine
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0007" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine #0007' -Description 'deny/quarantine' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol ICMPv6 -IcmpType @((0..132) + (138..255)) -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    # deny/quarantine
    foreach ($p in $StockadeOtherProtocols) {
        New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0008-p$p" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine #0008' -Description 'deny/quarantine' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol $p -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    }
    # deny/quarantine-out
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0009" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine-out #0009' -Description 'deny/quarantine-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol TCP -RemotePort @('25') -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    # deny/quarantine-out
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0010" -Group $StockadeGroup -DisplayName 'Stockade deny/quarantine-out #0010' -Description 'deny/quarantine-out' -Direction Outbound -Action Block -Profile Any -Enabled True -Protocol UDP -RemotePort @('53') -RemoteDynamicKeywordAddresses $StockadeKeywords['pbad00000003'] | Out-Null
    # ruleset/shop/0
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0011" -Group $StockadeGroup -DisplayName 'Stockade ruleset/shop/0 #0011' -Description 'ruleset/shop/0' -Direction Inbound -Action Allow -Profile Any -Enabled True -Protocol TCP -LocalPort @('443') -RemoteDynamicKeywordAddresses $StockadeKeywords['pcorp0000004'] | Out-Null
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
