"""``python -m msdseg`` runs the command line (used by the Slicer module's worker process)."""
import sys

from .cli import main

sys.exit(main())
