"""eBPF backend family: tc clsact datapath, identity tables, own ELF reader and bpf() loader, flow events."""
