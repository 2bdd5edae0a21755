"""The backend registry: a plain, greppable table from backend name to ``module:Class``.

Add a row to :data:`BACKEND_CLASSES` when a backend family lands. Nothing is imported until
a backend is asked for: :data:`BACKENDS` maps a name to its class, importing the module on
first lookup (listing the names imports nothing), so the agent starting with the default
backend does not pay for loading the eBPF, F5 or Windows code. ``get_backend`` builds one
with its options; an unknown name fails with the list of known ones.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

from stockade.backends.base import Backend
from stockade.bpf.build import CLANG_CANDIDATES
from stockade.errors import Issue, NotFoundError, ValidationError

BACKEND_CLASSES: dict[str, str] = {
    "nftables": "stockade.backends.nftables.backend:NftablesBackend",
    "iptables": "stockade.backends.iptables.backend:IptablesBackend",
    "ebpf": "stockade.backends.ebpf.backend:EbpfBackend",
    "windows": "stockade.backends.windows.backend:WindowsFirewallBackend",
    "ipfilter": "stockade.backends.ipfilter.backend:IpfilterBackend",
    "f5": "stockade.backends.f5.backend:F5Backend",
}


class LazyBackends(Mapping[str, type[Backend[Any]]]):
    """Name -> backend class, importing the class's module on lookup (in table order)."""

    def __init__(self, table: Mapping[str, str]) -> None:
        self._table = table

    def __getitem__(self, name: str) -> type[Backend[Any]]:
        module, _, attr = self._table[name].partition(":")
        cls: type[Backend[Any]] = getattr(importlib.import_module(module), attr)
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


BACKENDS: Mapping[str, type[Backend[Any]]] = LazyBackends(BACKEND_CLASSES)


def get_backend(name: str, **options: Any) -> Backend[Any]:
    """An instance of the backend called ``name``; NotFoundError for an unknown name."""
    if name not in BACKEND_CLASSES:
        known = ", ".join(sorted(BACKEND_CLASSES))
        raise NotFoundError(f"unknown backend {name!r} (known: {known})")
    cls = BACKENDS[name]
    accepted = {
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted))
        raise ValidationError(
            [Issue("", 0, f"backend {name}", f"does not take option {opt!r} (options: {takes})") for opt in unknown]
        )
    return cls(**options)


# The commands each Linux backend needs on the host (any one of a tuple will do).
HOST_TOOLS: dict[str, tuple[tuple[str, ...], ...]] = {
    "nftables": (("nft",),),
    "iptables": (("iptables-restore", "iptables-legacy-restore", "iptables-nft-restore"), ("ipset",)),
    "ebpf": (("tc",), CLANG_CANDIDATES),
}


def available_backends() -> tuple[str, ...]:
    """The Linux backends whose tools this host has. The agent reports them to the controller,
    which refuses a workload ``backend`` setting naming another (the agent refuses it as well)."""
    return tuple(name for name, needs in HOST_TOOLS.items()
                 if all(any(shutil.which(tool) for tool in options) for options in needs))
