"""``python -m vitviz ...`` runs the command line (also what ``torchrun -m vitviz train ...`` starts)."""

import sys

from vitviz.cli import main

sys.exit(main())
