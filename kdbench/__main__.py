"""`python -m kdbench` (and `accelerate launch -m kdbench`) run the same CLI as the `kdbench` script."""

from kdbench.cli import main

main()
