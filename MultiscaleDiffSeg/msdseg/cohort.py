"""Running many cases: input expansion, resume, per-case failure isolation.

A case either ends with all of its outputs complete (written atomically) or with none of them and
a reason in the failure list; one bad file never stops the others.  A second run skips cases whose
outputs are complete unless ``overwrite`` is set.
"""
from __future__ import annotations

import csv
import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import Cancelled, InputError
from .io import case_stem, is_image_path


@dataclass
class Case:
    path: Path
    stem: str


@dataclass
class CaseOutcome:
    case: Case
    status: str  # done | skipped | failed
    reason: str = ""
    info: dict = field(default_factory=dict)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (searched recursively for images), globs, and .txt/.csv lists of paths."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"{item}: pattern matches no file")
            out.extend(Path(m) for m in matches)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_path(f))
            t1 = [f for f in found if "T1w" in f.name or f.parent.name == "anat"]
            out.extend(t1 or found)
        elif p.suffix.lower() in {".txt", ".csv", ".tsv"} and p.exists():
            out.extend(_read_list(p))
        else:
            out.append(p)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _read_list(path: Path) -> list[Path]:
    """Paths from a text list (one per line) or a CSV with a 'path' column (or the first column)."""
    base = path.parent
    rows: list[str] = []
    if path.suffix.lower() in {".csv", ".tsv"}:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="") as f:
            reader = csv.reader(f, delimiter=delim)
            header = next(reader, [])
            col = next((i for i, h in enumerate(header) if h.strip().lower() in {"path", "image", "t1", "file"}), None)
            if col is None:
                rows.append(header[0] if header else "")
                col = 0
            rows.extend(r[col] for r in reader if r)
    else:
        rows = [line.strip() for line in path.read_text().splitlines()]
    out = []
    for r in rows:
        r = r.strip()
        if not r or r.startswith("#"):
            continue
        p = Path(r)
        out.append(p if p.is_absolute() else base / p)
    return out


def assign_stems(paths: list[Path]) -> list[Case]:
    """Case names from file stems; duplicates get their parent folders prefixed until unique."""
    stems = [case_stem(p) for p in paths]
    cases = []
    for p, s in zip(paths, stems):
        if stems.count(s) > 1:
            parts = [q.name for q in p.resolve().parents][:3]
            for depth in range(1, len(parts) + 1):
                cand = "_".join(reversed(parts[:depth])) + "_" + s
                others = ["_".join(reversed([q.name for q in o.resolve().parents][:depth])) + "_" + case_stem(o)
                          for o in paths if o != p and case_stem(o) == s]
                if cand not in others:
                    s = cand
                    break
        cases.append(Case(p, s))
    return cases


def segment_case(case: Case, outdir: Path, settings, progress=None, cancel=None, overwrite: bool = False) -> CaseOutcome:
    """Segment one case and write its outputs, or return why it failed (nothing written)."""
    from .inference import segment_image
    from .io import load_volume
    from .outputs import outputs_complete, write_case_outputs

    if not overwrite and outputs_complete(outdir, case.stem, settings.uncertainty):
        return CaseOutcome(case, "skipped", "outputs already complete")
    try:
        image = load_volume(case.path)
        result = segment_image(image, settings, progress=progress, cancel=cancel)
        write_case_outputs(result, outdir, case.stem)
        return CaseOutcome(case, "done", info={**result.info, "volumes": result.volumes})
    except (InputError, FileNotFoundError) as exc:
        return CaseOutcome(case, "failed", str(exc))
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the cohort
        return CaseOutcome(case, "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def run_cohort(
    inputs: list[str],
    outdir: Path,
    settings,
    *,
    jobs: int = 1,
    dask_address: str | None = None,
    overwrite: bool = False,
    progress_mode: str = "bar",
    report: bool = True,
    cancel: Callable[[], bool] | None = None,
) -> int:
    """The ``msdseg segment`` driver; returns the exit status (non-zero if any case failed)."""
    from .cli import _progress_printer

    paths = expand_inputs(inputs)
    if not paths:
        raise InputError("no input images found")
    cases = assign_stems(paths)
    outdir.mkdir(parents=True, exist_ok=True)
    outcomes: list[CaseOutcome] = []
    n = len(cases)
    for i, case in enumerate(cases):
        prefix = f"[{i + 1}/{n}] {case.stem}: " if n > 1 else ""
        cb = _progress_printer(progress_mode, prefix)
        outcome = segment_case(case, outdir, settings, progress=cb, cancel=cancel, overwrite=overwrite)
        outcomes.append(outcome)
        if outcome.status == "failed":
            print(f"msdseg: error: {case.path}: {_strip_path(outcome.reason, case.path)}", file=sys.stderr)
    if n > 1:
        write_failures_csv(outdir / "cohort_failures.csv", outcomes)
    failed = sum(o.status == "failed" for o in outcomes)
    return 1 if failed else 0


def write_failures_csv(path: Path, outcomes: list[CaseOutcome]) -> None:
    from .atomic import atomic_write_text

    lines = ["case,path,reason"]
    for o in outcomes:
        if o.status == "failed":
            reason = o.reason.replace('"', "'")
            lines.append(f'{o.case.stem},"{o.case.path}","{reason}"')
    atomic_write_text(path, "\n".join(lines) + "\n")


def _strip_path(reason: str, path: Path) -> str:
    """Messages from the reader start with the path; avoid printing it twice."""
    prefix = f"{path}: "
    return reason[len(prefix):] if reason.startswith(prefix) else reason
