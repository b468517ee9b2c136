"""``python -m lightning_htrmrl`` is the ``htrmrl`` command."""

from lightning_htrmrl.cli import main

main()
