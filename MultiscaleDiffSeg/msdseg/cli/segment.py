"""``msdseg segment``: one file or a whole cohort, through the same settings object every front end uses."""
from __future__ import annotations

import argparse
from pathlib import Path

from msdseg.core.progress import PROGRESS_MODES
from msdseg.core.settings import SegmentSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="image files, folders, globs, or .txt/.csv lists of paths")
    p.add_argument("-o", "--output", required=True, help="output folder")
    SegmentSettings.add_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="redo cases whose outputs already exist")
    p.add_argument("--jobs", type=int, default=1,
                   help="local worker processes; each loads the model once and uses cores/jobs threads")
    p.add_argument("--dask", default=None, metavar="SCHEDULER",
                   help="send cases to the Dask cluster at this address (e.g. tcp://host:8786); the inputs and "
                        "the output folder must be on a file system the workers share")
    p.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS",
                   help="fail a case that runs longer than this (default: MSDSEG_CASE_TIMEOUT_S, else no limit)")
    p.add_argument("--progress", default="bar", choices=list(PROGRESS_MODES))
    p.add_argument("--no-report", action="store_true",
                   help="several inputs: write the cohort CSVs but not cohort_report.html")


def run(args: argparse.Namespace) -> int:
    from msdseg.batch.cohort import run_cohort

    settings = SegmentSettings.from_cli(args).validate()  # bad options fail before any input is read
    return run_cohort(
        args.inputs, Path(args.output), settings, jobs=args.jobs, dask_address=args.dask,
        overwrite=args.overwrite, progress_mode=args.progress, report=not args.no_report,
        case_timeout_s=args.case_timeout,
    )
