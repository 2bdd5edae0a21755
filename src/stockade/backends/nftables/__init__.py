"""nftables backend family: pure renderer, nft runner, direct netlink set deltas, the Backend."""
