"""Stockade's eBPF datapath: the C source (``stockade.bpf.c``) and its on-demand build.

The object file is never shipped or committed: :func:`stockade.bpf.build.object_path`
compiles the source with the system's clang on first use into a cache directory keyed
by the source's hash and the compiler's version.
"""
