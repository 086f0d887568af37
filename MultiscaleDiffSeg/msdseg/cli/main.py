"""``msdseg`` command line: segment, demo, info, and the optional evaluate, web, train, prepare-data.

Every user-facing failure is one line on stderr and a non-zero exit; tracebacks only with
``--debug``.  ``--progress json`` prints one JSON object per progress event on stdout so the Slicer
module and the web app can drive a progress bar from a child process.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from msdseg.cli import demo, info, segment
from msdseg.cli.commands import add_optional_commands
from msdseg.core.allocator import keep_freed_memory
from msdseg.core.errors import Cancelled, InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msdseg", description="Multiscale diffusion brain MRI segmentation")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, text in (
        ("segment", segment, "segment T1 volumes"),
        ("demo", demo, "segment the embedded sample T1 and write an overlay PNG"),
        ("info", info, "versions, device, model and label tree"),
    ):
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    add_optional_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # this process is msdseg's from start to end (see msdseg.core.allocator)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except (InputError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"msdseg: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("msdseg: cancelled", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(f"msdseg: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
