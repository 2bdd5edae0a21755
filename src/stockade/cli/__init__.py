"""The ``stockade`` command line. Each area registers its commands from its own module.

Failures are one line plus a hint and a documented exit code (:mod:`stockade.cli.errors`); the
environment variables every command reads are listed in :data:`stockade.cli.config.ENVIRONMENT`
and in ``stockade --help``.
"""

from __future__ import annotations

import click

from stockade import __version__
from stockade.cli.config import ENVIRONMENT
from stockade.cli.errors import EXIT_CODES_HELP, StockadeGroup

_WIDTH = max(len(k) for k in ENVIRONMENT)
EPILOG = (
    "\b\nEnvironment:\n"
    + "\n".join(f"  {k.ljust(_WIDTH)}  {v}" for k, v in ENVIRONMENT.items())
    + "\n\n" + EXIT_CODES_HELP
)


@click.group(cls=StockadeGroup, epilog=EPILOG)
@click.version_option(__version__, prog_name="stockade")
def main() -> None:
    """Stockade: label-based microsegmentation on each host's native firewall."""


def _register() -> None:
    # Imported for their side effect of adding commands to ``main``.
    from stockade.cli import demo_cmds, policy_cmds  # noqa: F401

    for optional in ("backend_cmds", "lab_cmds", "controller_cmds", "agent_cmds", "backends_matrix_cmds",
                     "flows_cmds", "session_cmds", "import_cmds", "verify_cmds", "k8s_cmds"):
        try:
            __import__(f"stockade.cli.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"stockade.cli.{optional}":
                raise


_register()
