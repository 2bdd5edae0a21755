# Stockade Windows Firewall policy: workload web-1, mode selective
# peers: dynamic-keywords; rules: 1; keywords: 1
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
    $StockadeKeywords['pcorp0000004'] = New-StockadeKeyword -Name 'pcorp0000004' -Addresses '10.0.0.0/8,172.16.0.0/12,fd00::/48'
    # deny/no-corp-ssh-alt
    New-NetFirewallRule -Name "$StockadeRulePrefix$StockadeGeneration-0001" -Group $StockadeGroup -DisplayName 'Stockade deny/no-corp-ssh-alt #0001' -Description 'deny/no-corp-ssh-alt' -Direction Inbound -Action Block -Profile Any -Enabled True -Protocol TCP -LocalPort @('2222') -RemoteDynamicKeywordAddresses $StockadeKeywords['pcorp0000004'] | Out-Null
    Set-NetFirewallProfile -All -Enabled True -DefaultInboundAction Allow -DefaultOutboundAction Allow -LogAllowed False -LogBlocked True
} catch {
    Remove-StockadeObjects -Generation $StockadeGeneration -Keep $false
    throw
}
Remove-StockadeObjects -Generation $StockadeGeneration -Keep $true
