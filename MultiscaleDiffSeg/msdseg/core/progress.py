"""Progress callbacks that print: JSON lines for a parent process, a tqdm bar for a person.

Shared by the command line and the cohort runner, which both turn ``progress(fraction, message)``
events into output; ``--progress json`` is what the Slicer module and the web app read from a
child process.
"""
from __future__ import annotations

import json
import sys
from typing import Callable

ProgressFn = Callable[[float, str], None]
PROGRESS_MODES = ("bar", "json", "none")


def progress_printer(mode: str, prefix: str = "") -> ProgressFn:
    """A progress callback: JSON lines (``json``), a tqdm bar on stderr (``bar``), or nothing."""
    if mode == "json":
        def emit(frac: float, msg: str) -> None:
            print(json.dumps({"progress": round(float(frac), 4), "message": f"{prefix}{msg}"}), flush=True)
        return emit
    if mode == "bar":
        from tqdm import tqdm

        bar = tqdm(total=1000, desc=prefix.strip().rstrip(":") or "segment", unit="‰", leave=False, file=sys.stderr)

        def update(frac: float, msg: str) -> None:
            bar.n = int(1000 * frac)
            bar.set_postfix_str(msg[:40], refresh=False)  # one render per update, not two (log files)
            bar.refresh()
            if frac >= 1.0:
                bar.close()
        return update
    return lambda frac, msg: None
