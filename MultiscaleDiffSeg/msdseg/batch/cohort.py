"""``msdseg segment`` for one or many inputs: expansion, naming, resume, workers, cohort files.

A case either ends with all of its outputs complete (written atomically) or with none of them and
a reason in the failure list; one bad file never stops the others.  A second run skips cases whose
outputs are complete unless ``overwrite`` is set.  With several inputs the run also writes, next
to the per-case files: ``cohort_failures.csv``, ``cohort_volumes.csv``, ``cohort_report.html``,
a sidecar ``S_case.json`` + thumbnail ``S_overlay.png`` per case and ``logs/S.log`` (see
``docs/cohorts.md``).  The cohort files are rebuilt from the sidecars on every run, so cases skipped
on resume appear exactly as if they had just been segmented.

Who runs the cases: this process (``--jobs 1``), a local process pool (``--jobs N``,
:mod:`msdseg.batch.pool`) or a Dask cluster (``--dask ADDRESS``, :mod:`msdseg.batch.dask_runner`); all of
them call :func:`msdseg.batch.workers.process_case`, so results do not depend on the choice.

SIGINT / SIGTERM: the first signal stops scheduling; running cases are cancelled at their next
diffusion step (through ``segment_image``'s ``cancel`` callback) and write nothing, a case that is
already writing its files finishes.  The exit status is 128 + the signal number, the cohort CSVs
reflect what was finished, and running the same command again resumes.  A second signal aborts at
once (atomic writes still leave no partial file under a final name).
"""
from __future__ import annotations

import csv
import glob
import io
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from msdseg.core.errors import InputError
from msdseg.core.io import IMAGE_SUFFIXES, case_stem, is_image_path
from msdseg.batch.workers import Case, CaseOutcome, process_case

LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".list")
#: Files this program writes; never taken as inputs when a folder holding results is scanned.
OUTPUT_SUFFIXES = ("_labels.nii.gz", "_uncertainty.nii.gz", ".seg.nrrd")
#: Folders of a BIDS-like tree that hold no raw T1 images.
SKIP_FOLDERS = {"derivatives", "sourcedata", "code", "logs"}
_T1_NAME = re.compile(r"(^|[_\-.])(T1w?|MPRAGE|MP2RAGE|SPGR)([_\-.]|$)", re.IGNORECASE)
_PATH_COLUMNS = ("path", "image", "t1", "t1w", "file", "filename", "input")

__all__ = ["Case", "CaseOutcome", "assign_stems", "case_complete", "expand_inputs", "run_cohort"]


# ----------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Iterable[str | os.PathLike], exclude: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """Image paths from files, folders, globs and lists, in a stable order, without duplicates.

    * a file is taken as is (a missing one fails as its own case, not the run);
    * a folder: a BIDS-like tree (``dataset_description.json`` or ``sub-*`` folders) gives its
      ``*_T1w`` images outside ``derivatives/``, ``sourcedata/``, ...; any other folder gives its
      images (recursively), only the T1-named ones (``T1``, ``T1w``, ``MPRAGE``, ...) when there
      are such; hidden files/folders and this program's own outputs are ignored;
    * a glob (``*``, ``?``, ``[``, ``**``) expands to the images it matches (an error if none);
    * a ``.txt``/``.list`` file lists one path, folder or glob per line (``#`` comments); a
      ``.csv``/``.tsv`` has a ``path``/``image``/``t1`` column (else the column that holds image
      paths); relative entries are relative to the list file.

    ``exclude``: folders whose contents are never inputs (the output folder).
    """
    excluded = [Path(os.path.abspath(os.path.expanduser(str(e)))) for e in exclude]
    out: list[Path] = []
    for item in inputs:
        out.extend(_expand_item(str(item), None, excluded, allow_lists=True))
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.normcase(os.path.realpath(p))
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _expand_item(item: str, base: Path | None, excluded: list[Path], allow_lists: bool) -> list[Path]:
    text = os.path.expanduser(item.strip())
    p = Path(text)
    if base is not None and not p.is_absolute():
        p = base / p
        text = str(p)
    if p.is_dir():
        return _scan_folder(p, excluded)
    if p.is_file() and allow_lists and p.name.lower().endswith(LIST_SUFFIXES) and not is_image_path(p):
        return _read_list(p, excluded)
    if any(ch in text for ch in "*?[") and not p.exists():
        matches = sorted(glob.glob(text, recursive=True))
        found: list[Path] = []
        for m in matches:
            mp = Path(m)
            if mp.is_dir():
                found.extend(_scan_folder(mp, excluded))
            elif mp.is_file() and is_image_path(mp) and not _is_output(mp) and not _under(mp, excluded):
                found.append(mp)
        if not found:
            raise InputError(f"{item}: pattern matches no image file")
        return found
    return [p]


def _is_output(p: Path) -> bool:
    return p.name.lower().endswith(OUTPUT_SUFFIXES)


def _under(p: Path, folders: list[Path]) -> bool:
    ap = Path(os.path.abspath(p))
    return any(ap == f or f in ap.parents for f in folders)


def _scan_folder(folder: Path, excluded: list[Path]) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d.lower() not in SKIP_FOLDERS
                         and not _under(rootp / d, excluded))
        files.extend(rootp / n for n in sorted(names)
                     if not n.startswith(".") and is_image_path(n) and not _is_output(Path(n)))
    bids = (folder / "dataset_description.json").exists() or any(d.name.startswith("sub-") for d in folder.iterdir()
                                                                  if d.is_dir())
    if bids:
        t1w = [f for f in files if case_stem(f).endswith("_T1w")]
        if t1w:
            return t1w
    t1 = [f for f in files if _T1_NAME.search(case_stem(f))]
    return t1 or files


def _read_list(path: Path, excluded: list[Path]) -> list[Path]:
    """Entries of a text list or a CSV/TSV (see :func:`expand_inputs`)."""
    base = path.parent
    entries: list[str] = []
    if path.suffix.lower() in {".csv", ".tsv"}:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read()
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = [r for r in csv.reader(io.StringIO(sample), delimiter=delim) if r and any(c.strip() for c in r)]
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        col = next((header.index(n) for n in _PATH_COLUMNS if n in header), None)
        body = rows[1:]
        if col is None:  # no known header: the column holding image paths; row 0 may be data
            width = max(len(r) for r in rows)
            hits = [sum(1 for r in rows if i < len(r) and is_image_path(r[i].strip())) for i in range(width)]
            col = max(range(width), key=lambda i: hits[i])
            body = rows if is_image_path(rows[0][col].strip()) else rows[1:]
        entries = [r[col].strip() for r in body if col < len(r) and r[col].strip()]
    else:
        entries = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    out: list[Path] = []
    for e in entries:
        out.extend(_expand_item(e, base, excluded, allow_lists=False))
    return out


# ----------------------------------------------------------------------------- case names
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("_") or "case"


def assign_stems(paths: Sequence[Path]) -> list[Case]:
    """A unique output name per input, from its file name.

    Files with the same name (``a/T1w.nii.gz``, ``b/T1w.nii.gz``) get the nearest parent folders
    that tell them apart (``a_T1w``, ``b_T1w``; folders equal for all of them, like ``anat``, are
    left out); same folder and name with another format get the format (``x_mgz``).  Names are
    compared case-insensitively (macOS and Windows file systems), and any remaining clash gets
    ``_2``, ``_3``, ...
    """
    stems = [_safe(case_stem(p)) for p in paths]
    names = list(stems)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        groups.setdefault(s.casefold(), []).append(i)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        parents = [list(reversed(Path(os.path.abspath(paths[i])).parent.parts)) for i in idx]
        depth_max = max(len(p) for p in parents)
        for depth in range(1, depth_max + 1):
            tails = [tuple(p[:depth]) for p in parents]
            if len(set(tails)) == len(tails) or depth == depth_max:
                break
        keep = [lvl for lvl in range(depth) if len({p[lvl] if lvl < len(p) else "" for p in parents}) > 1]
        for i, p in zip(idx, parents):
            prefix = "_".join(_safe(p[lvl]) for lvl in reversed(keep) if lvl < len(p))
            names[i] = f"{prefix}_{stems[i]}" if prefix else stems[i]
        clash: dict[str, list[int]] = {}
        for i in idx:
            clash.setdefault(names[i].casefold(), []).append(i)
        for same in clash.values():
            if len(same) > 1:
                for i in same:
                    suffix = next((s for s in IMAGE_SUFFIXES if str(paths[i]).lower().endswith(s)), "")
                    names[i] = f"{names[i]}_{_safe(suffix.lstrip('.').replace('.', '_'))}" if suffix else names[i]
    taken: set[str] = set()
    cases = []
    for p, name in zip(paths, names):
        final, k = name, 2
        while final.casefold() in taken:
            final, k = f"{name}_{k}", k + 1
        taken.add(final.casefold())
        cases.append(Case(Path(p), final))
    return cases


# ----------------------------------------------------------------------------- resume
def case_complete(outdir: Path, stem: str, uncertainty: bool, cohort: bool) -> bool:
    """Finished: image outputs complete, and in a cohort also a valid sidecar (``S_case.json``)."""
    from msdseg.outputs.writers import outputs_complete
    from msdseg.outputs.sidecar import sidecar_valid

    return outputs_complete(outdir, stem, uncertainty) and (not cohort or sidecar_valid(outdir, stem))


def _already_done(case: Case, outdir: Path, settings: Any, cohort: bool) -> bool:
    """Skip before any worker starts: the outputs were made from this input, settings and model
    and are unchanged (:mod:`msdseg.outputs.provenance`), and in a cohort the sidecar is valid."""
    from msdseg.batch.workers import assess_case
    from msdseg.outputs.sidecar import sidecar_valid

    try:
        current = assess_case(case, outdir, settings).state == "current"
    except OSError:
        return False  # the worker reports the unreadable input
    return current and (not cohort or sidecar_valid(outdir, case.stem))


# ----------------------------------------------------------------------------- signals
class SignalStop:
    """First SIGINT/SIGTERM: set a flag (stop scheduling, cancel running cases); second: abort.

    Only the main thread can install handlers; elsewhere (e.g. a GUI worker thread) the caller's
    own ``cancel`` callback is the only way to stop.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            for sig, old in self._old.items():  # a second signal acts as if we were not here
                signal.signal(sig, old)
            print(f"msdseg: {signal.Signals(signum).name}: stopping -- running cases are cancelled, "
                  "finished ones are kept (signal again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- progress display
class Display:
    """Progress for people (a tqdm bar over the cohort) or programs (JSON lines), and error lines.

    JSON lines keep the per-case form ``[k/n] stem: message`` with the case's own fraction, which
    the Slicer module turns into overall progress; ``k`` counts cases in the order they finish or
    start, so overall progress never goes back.
    """

    def __init__(self, mode: str, total: int) -> None:
        self.mode, self.total, self.finished = mode, total, 0
        self.bar = None
        self._single = None
        if mode == "bar" and total > 1:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", desc="cohort", file=sys.stderr, dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}] {postfix}")
        self.counts = {"done": 0, "skipped": 0, "failed": 0, "cancelled": 0}

    def case_callback(self, case: Case) -> Callable[[float, str], None]:
        """Per-case progress (in-process runs only)."""
        k = self.finished + 1
        if self.total == 1:
            from msdseg.core.progress import progress_printer

            return progress_printer(self.mode)
        if self.mode == "json":
            from msdseg.core.progress import progress_printer

            return progress_printer("json", f"[{k}/{self.total}] {case.stem}: ")
        if self.bar is not None:
            bar = self.bar

            def update(frac: float, msg: str) -> None:
                bar.n = min(self.finished + float(frac), self.total)
                bar.set_postfix_str(f"{case.stem}: {msg}"[:50], refresh=True)
            return update
        return lambda f, m: None

    def finished_case(self, outcome: CaseOutcome, in_process: bool) -> None:
        self.finished += 1
        self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
        if self.mode == "json" and self.total > 1 and (not in_process or outcome.status != "done"):
            import json

            print(json.dumps({"progress": 1.0, "message": f"[{self.finished}/{self.total}] {outcome.case.stem}: "
                              f"{outcome.status}", "case": outcome.case.stem, "status": outcome.status}), flush=True)
        if self.bar is not None:
            self.bar.n = self.finished
            self.bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in self.counts.items() if v), refresh=True)
        if outcome.status == "failed":
            self.error(f"msdseg: error: {outcome.case.path}: {_strip_path(outcome.reason, outcome.case.path)}")

    def error(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- the driver
#: Per-case time limit in seconds when the caller gives none (unset: no limit).
CASE_TIMEOUT_ENV = "MSDSEG_CASE_TIMEOUT_S"


def case_timeout_from_environment() -> float | None:
    """``MSDSEG_CASE_TIMEOUT_S`` as seconds, or None (no limit); a bad value is a one-line error."""
    text = os.environ.get(CASE_TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InputError(f"{CASE_TIMEOUT_ENV}={text!r}: expected a number of seconds above 0")
    return value


def run_cohort(
    inputs: Sequence[str],
    outdir: Path,
    settings: Any,
    *,
    jobs: int = 1,
    dask_address: str | None = None,
    overwrite: bool = False,
    progress_mode: str = "bar",
    report: bool = True,
    cancel: Callable[[], bool] | None = None,
    case_timeout_s: float | None = None,
) -> int:
    """The ``msdseg segment`` driver; returns the exit status.

    0: every case done or skipped; 1: at least one case failed; 128 + signal number (130 for
    ``cancel``) when stopped early.  The output folder is locked for the whole run
    (:mod:`msdseg.core.lock`): a second run into it is refused with one line naming this one.
    ``case_timeout_s`` (default ``MSDSEG_CASE_TIMEOUT_S``, else none): a case running longer fails.
    """
    from msdseg.core.lock import FolderLock
    from msdseg.outputs.provenance import model_sha256

    if jobs < 1:
        raise InputError("--jobs must be 1 or more")
    if case_timeout_s is None:
        case_timeout_s = case_timeout_from_environment()
    outdir = Path(outdir)
    paths = expand_inputs(inputs, exclude=[outdir])
    if not paths:
        raise InputError("no input images found")
    cases = assign_stems(paths)
    if dask_address:
        from msdseg.batch.dask_runner import settings_for_workers

        settings = settings_for_workers(settings)  # before the resume check, which records the same
    runner = _Runner(jobs, dask_address, overwrite, case_timeout_s, model_sha256(getattr(settings, "model", None)))
    outdir.mkdir(parents=True, exist_ok=True)
    with FolderLock(outdir):
        return _run_locked(cases, outdir, settings, runner, progress_mode, report, cancel)


@dataclass(frozen=True)
class _Runner:
    """Who runs the cases, and the run-wide options every runner passes to each case."""

    jobs: int
    dask_address: str | None
    overwrite: bool
    timeout_s: float | None
    expected_model: str  # the model's SHA256 when the run started (see process_case)


def _run_locked(cases: list[Case], outdir: Path, settings: Any, runner: _Runner, progress_mode: str,
                report: bool, cancel: Callable[[], bool] | None) -> int:
    from msdseg.core.atomic import remove_stale_temporaries

    n = len(cases)
    cohort = n > 1
    remove_stale_temporaries(outdir)
    outcomes: dict[str, CaseOutcome] = {}
    display = Display(progress_mode, n)
    t0 = time.time()
    with SignalStop() as sig:
        def stop() -> bool:
            return sig.signum is not None or (cancel is not None and bool(cancel()))

        try:
            todo = []
            for case in cases:  # cheap header reads: finished cases never reach a worker
                if not runner.overwrite and _already_done(case, outdir, settings, cohort):
                    outcomes[case.stem] = CaseOutcome(case, "skipped", "outputs already complete")
                    display.finished_case(outcomes[case.stem], in_process=False)
                else:
                    todo.append(case)
            for outcome in _run_cases(todo, outdir, settings, runner, cohort, stop, display):
                outcomes[outcome.case.stem] = outcome
                display.finished_case(outcome, in_process=runner.jobs == 1 and not runner.dask_address)
        finally:
            display.close()
        stopped = stop()
        signum = sig.signum
    for case in cases:
        outcomes.setdefault(case.stem, CaseOutcome(case, "cancelled", "not started"))
    ordered = [outcomes[c.stem] for c in cases]
    if cohort:
        write_cohort_files(outdir, ordered, settings, report=report and not stopped,
                           run_info={"output folder": str(outdir), "wall seconds": round(time.time() - t0, 1),
                                     "jobs": runner.jobs, "dask": runner.dask_address or "no"})
        counts = {s: sum(o.status == s for o in ordered) for s in ("done", "skipped", "failed", "cancelled")}
        summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        print(f"msdseg: {n} cases: {summary}; cohort files in {outdir}", file=sys.stderr, flush=True)
    if stopped:
        finished = sum(o.status in ("done", "skipped") for o in ordered)
        why = signal.Signals(signum).name if signum else "cancel"
        print(f"msdseg: cancelled ({why}): {finished} of {n} cases finished; run the same command again to resume",
              file=sys.stderr, flush=True)
        return 128 + int(signum) if signum else 130
    return 1 if any(o.status in ("failed", "cancelled") for o in ordered) else 0


def _run_cases(todo: list[Case], outdir: Path, settings: Any, runner: _Runner, cohort: bool,
               stop: Callable[[], bool], display: Display) -> Iterator[CaseOutcome]:
    if not todo:
        return
    common = {"cohort": cohort, "overwrite": runner.overwrite, "expected_model": runner.expected_model}
    if runner.dask_address:
        from msdseg.batch.dask_runner import run_dask

        yield from run_dask(todo, outdir, settings, address=runner.dask_address, stop=stop,
                            timeout_s=runner.timeout_s, **common)
        return
    if runner.jobs > 1 and len(todo) > 1:
        from msdseg.batch.pool import run_local_pool

        yield from run_local_pool(todo, outdir, settings, jobs=runner.jobs, stop=stop, timeout_s=runner.timeout_s,
                                  **common)
        return
    for case in todo:
        if stop():
            yield CaseOutcome(case, "cancelled", "not started")
            continue
        yield process_case(case, outdir, settings, cancel=stop, progress=display.case_callback(case),
                           timeout_s=runner.timeout_s, **common)


# ----------------------------------------------------------------------------- cohort files
def write_failures_csv(path: Path, outcomes: Sequence[CaseOutcome]) -> None:
    """``case,path,reason`` for every case that failed or was not finished (cancelled)."""
    from msdseg.core.atomic import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "path", "reason"])
    for o in outcomes:
        if o.status == "failed":
            writer.writerow([o.case.stem, str(o.case.path), _strip_path(o.reason, o.case.path)])
        elif o.status == "cancelled":
            writer.writerow([o.case.stem, str(o.case.path), f"cancelled ({o.reason}); run again to resume"])
    atomic_write_text(path, buf.getvalue())


def cohort_table(sidecars: Sequence[dict], qc: dict, tree: Any) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of ``cohort_volumes.csv`` (one row per successfully segmented case)."""
    nodes = [node.id for node in tree.nodes]
    leaves = [leaf.id for leaf in tree.leaves]
    pairs = [node.id[len("left_"):] for node in tree.nodes if node.id.startswith("left_") and tree.twin(node.id)]
    run_keys = ["model", "trained", "preset", "steps", "samples", "seed", "device", "seconds"]
    columns = (["case", "input", "qc_flag", "qc_reasons", "icv_ml", "labelled_ml", "brain_mean_uncertainty"]
               + [f"{n}_ml" for n in nodes] + [f"ai_{p}" for p in pairs] + [f"unc_{leaf}" for leaf in leaves]
               + run_keys + ["rebuilt_from_outputs"])
    rows = []
    for doc in sidecars:
        res = qc[doc["case"]]
        vols, asym = doc.get("volumes_ml", {}), doc.get("asymmetry") or {}
        unc, info = doc.get("uncertainty_by_structure") or {}, doc.get("info") or {}
        rows.append([doc["case"], doc.get("input", ""), res.flag, res.text, _cell(doc.get("icv_ml")),
                     _cell(doc.get("labelled_ml")), _cell(doc.get("brain_mean_uncertainty"))]
                    + [_cell(vols.get(n)) for n in nodes] + [_cell(asym.get(p)) for p in pairs]
                    + [_cell(unc.get(leaf)) for leaf in leaves] + [_cell(info.get(k)) for k in run_keys]
                    + [bool(doc.get("rebuilt_from_outputs"))])
    return columns, rows


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


def write_cohort_files(outdir: Path, outcomes: Sequence[CaseOutcome], settings: Any, *, report: bool = True,
                       run_info: dict | None = None) -> dict[str, Path]:
    """``cohort_failures.csv``, ``cohort_volumes.csv`` and (unless ``report`` is False) the HTML report."""
    from msdseg.core.atomic import atomic_write_text
    from msdseg.core.labels import load_tree
    from msdseg.batch.qc import CaseQCInput, assess_cohort
    from msdseg.outputs.sidecar import read_sidecar

    tree = load_tree()
    written = {"failures": outdir / "cohort_failures.csv", "volumes": outdir / "cohort_volumes.csv"}
    write_failures_csv(written["failures"], outcomes)
    sidecars = []
    for o in outcomes:
        if o.status in ("done", "skipped"):
            doc = read_sidecar(outdir, o.case.stem)
            if doc is not None:
                sidecars.append(doc)
    qc = assess_cohort([CaseQCInput.from_sidecar(d) for d in sidecars], [leaf.id for leaf in tree.leaves],
                       tree.root.id)
    columns, rows = cohort_table(sidecars, qc, tree)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(written["volumes"], buf.getvalue())
    _warn_other_settings(sidecars, settings)
    write_report = None
    if report:
        try:
            from msdseg.batch.report import write_report
        except ImportError as exc:  # 3D Slicer ships no matplotlib: cases and CSVs are complete without it
            print(f"msdseg: cohort_report.html not written: it needs matplotlib ({exc})", file=sys.stderr)
    if write_report is not None:
        failures = [(o.case.stem, str(o.case.path), _strip_path(o.reason, o.case.path))
                    for o in outcomes if o.status in ("failed", "cancelled")]
        info = {"preset": getattr(settings, "preset", ""), "model": (sidecars[0].get("info") or {}).get("model", "")
                if sidecars else "", **(run_info or {})}
        written["report"] = write_report(outdir / "cohort_report.html", sidecars, qc, failures, tree, run_info=info)
    return written


_SETTINGS_KEYS = ("preset", "steps", "samples", "seed", "model", "spacing_mm", "precision", "mirror", "refine_mm")


def _warn_other_settings(sidecars: Sequence[dict], settings: Any) -> None:
    """Resume keeps finished cases whatever settings made them; say so when they differ."""
    current = asdict(settings) if is_dataclass(settings) else {}
    differ = [d["case"] for d in sidecars
              if any((d.get("settings") or {}).get(k) != current.get(k) for k in _SETTINGS_KEYS if k in current)
              and not d.get("rebuilt_from_outputs")]
    if differ:
        print(f"msdseg: warning: {len(differ)} finished case(s) were made with other settings (e.g. {differ[0]}); "
              "use --overwrite to redo them", file=sys.stderr)


def _strip_path(reason: str, path: Path) -> str:
    """Messages from the reader start with the path; avoid printing it twice."""
    prefix = f"{path}: "
    return reason[len(prefix):] if reason.startswith(prefix) else reason
