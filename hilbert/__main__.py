"""``python -m hilbert``: the same command line as the ``hilbert`` script."""

from hilbert.cli import main

main()
