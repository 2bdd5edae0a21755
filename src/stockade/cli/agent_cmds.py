"""``stockade agent`` (run, ``install``, ``uninstall``): the commands live in :mod:`stockade.agent.main`
so ``python -m stockade.agent`` can run them without importing the rest of the CLI."""

from __future__ import annotations

from stockade.agent.main import agent
from stockade.cli import main

main.add_command(agent)
