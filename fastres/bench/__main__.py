"""python -m fastres.bench: see fastres.bench.cli."""
import sys

from .cli import main

sys.exit(main())
