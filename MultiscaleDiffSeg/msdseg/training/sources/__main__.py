"""``python -m msdseg.training.sources --out DIR``: the same as ``msdseg prepare-data``."""
from __future__ import annotations

import argparse
import sys

from msdseg.training.sources.cli import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m msdseg.training.sources", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
