"""glibc's malloc knobs for agents that hold many runtimes in one process (the Kubernetes node agent).

CUDD (a proof's BDD manager) and CPython's larger objects take their memory from glibc's malloc,
in an arena per thread (up to 8 per core). A node agent runs ~8 threads per pod and proves on
many of them; freed memory stays in the arena that held it: at 110 pods 15 arenas held 516 of the
node agent's 620 MiB. :func:`trim` gives every arena's free pages back (after a proof's manager is
collected); :func:`limit_arenas` makes threads share fewer arenas, so what one thread frees another
reuses (bench/k8s.py, 110 pods: 568 -> 388 MiB at rest with 2 arenas, CPU unchanged). Elsewhere
than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

M_ARENA_MAX = -8  # mallopt parameter (glibc's malloc.h)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc's, or AttributeError
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def trim() -> None:
    """``malloc_trim(0)``: free pages of every arena back to the kernel (a few ms)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas from now on (threads made later share them), unless the
    process was started with ``MALLOC_ARENA_MAX`` (the operator's choice stands). True when set."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(M_ARENA_MAX, arenas))
