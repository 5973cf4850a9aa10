"""`python -m crossfed` is the `crossfed` command."""

from crossfed.cli import main

main()
