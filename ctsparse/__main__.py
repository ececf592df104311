"""`python -m ctsparse` (also what torchrun launches)."""

from ctsparse.cli.main import run

run()
