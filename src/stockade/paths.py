"""Where bundled files live: the example estate (a source checkout or an installed wheel)."""

from __future__ import annotations

from pathlib import Path

from stockade.errors import NotFoundError

_PKG = Path(__file__).resolve().parent


def example_estate() -> Path:
    """The bundled example policy directory (examples/estate)."""
    for candidate in (_PKG.parent.parent / "examples" / "estate", _PKG / "_examples" / "estate"):
        if candidate.is_dir():
            return candidate
    raise NotFoundError("the example estate is not installed (expected examples/estate)")
