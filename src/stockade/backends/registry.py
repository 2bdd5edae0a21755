"""The backend registry: a plain, greppable table from backend name to class.

Add a row here when a backend module lands. ``get_backend`` builds one with its options;
an unknown name fails with the list of known ones.
"""

from __future__ import annotations

import inspect
from typing import Any

from stockade.backends.base import Backend
from stockade.backends.ebpf.backend import EbpfBackend
from stockade.backends.f5.backend import F5Backend
from stockade.backends.ipfilter.backend import IpfilterBackend
from stockade.backends.iptables.backend import IptablesBackend
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.windows.backend import WindowsFirewallBackend
from stockade.errors import Issue, NotFoundError, ValidationError

BACKENDS: dict[str, type[Backend[Any]]] = {
    "nftables": NftablesBackend,
    "iptables": IptablesBackend,
    "ebpf": EbpfBackend,
    "windows": WindowsFirewallBackend,
    "ipfilter": IpfilterBackend,
    "f5": F5Backend,
}


def get_backend(name: str, **options: Any) -> Backend[Any]:
    """An instance of the backend called ``name``; NotFoundError for an unknown name."""
    cls = BACKENDS.get(name)
    if cls is None:
        known = ", ".join(sorted(BACKENDS))
        raise NotFoundError(f"unknown backend {name!r} (known: {known})")
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
