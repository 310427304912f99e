"""``python -m splitinfer`` is the ``splitinfer`` command."""

from splitinfer.cli import main

main()
