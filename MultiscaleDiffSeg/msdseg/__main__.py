"""``python -m msdseg`` runs the command line (used by the Slicer module's worker process)."""
import sys

from msdseg.cli.main import main

sys.exit(main())
