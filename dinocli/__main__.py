"""``python -m dinocli`` runs the ``dino`` command (used by torchrun)."""

from dinocli.cli import main

main()
