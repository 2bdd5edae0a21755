"""``python -m stockade.cli`` runs the ``stockade`` command."""

from stockade.cli import main

main()
