"""iptables + ipset backend family (legacy and nft variants): renderer, restore scripts, runner, the Backend."""
