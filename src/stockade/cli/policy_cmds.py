"""Policy commands: check, compile, explain, demo."""

from __future__ import annotations

from stockade.cli import main

__all__ = ["main"]
