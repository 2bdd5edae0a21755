"""``stockade backends``: every registered backend and the policy features it declares."""

from __future__ import annotations

import click

from stockade.backends.capability_matrix import capability_matrix, render_markdown, render_text
from stockade.cli import main


@main.command("backends")
@click.option("--markdown", is_flag=True, help="Print docs/backends.md (the same matrix, as Markdown).")
def backends(markdown: bool) -> None:
    """Print the capability matrix: each backend x each policy feature (from the declarations)."""
    matrix = capability_matrix()
    click.echo(render_markdown(matrix) if markdown else render_text(matrix), nl=False)
