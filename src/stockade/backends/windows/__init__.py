"""Windows Firewall backend family: rule model, NetSecurity PowerShell renderer and scripts, the Backend."""
