"""The ``stockade`` command line. Each area registers its commands from its own module."""

from __future__ import annotations

import click

from stockade import __version__


@click.group()
@click.version_option(__version__, prog_name="stockade")
def main() -> None:
    """Stockade: label-based microsegmentation on each host's native firewall."""


def _register() -> None:
    # Imported for their side effect of adding commands to ``main``.
    from stockade.cli import demo_cmds, policy_cmds  # noqa: F401

    for optional in ("backend_cmds", "lab_cmds", "controller_cmds", "agent_cmds", "backends_matrix_cmds",
                     "flows_cmds"):
        try:
            __import__(f"stockade.cli.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"stockade.cli.{optional}":
                raise


_register()
