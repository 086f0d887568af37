"""One case from input file to finished outputs: the code every runner calls.

:func:`process_case` is the only code that touches a case; the in-process loop, the local pool
and Dask workers all call it, so resume, failure isolation and the sidecar behave identically
whatever runs the cohort.  It never raises for a bad case: it returns a :class:`CaseOutcome`
whose reason is one line, with the full traceback in the case's log (``OUTDIR/logs/S.log``).

The local pool that runs many cases at once is :mod:`msdseg.batch.pool`; the thread helpers here
serve it and the Dask workers alike.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from msdseg.core.errors import Cancelled, InputError

if TYPE_CHECKING:
    from msdseg.outputs.provenance import Assessment

ProgressFn = Callable[[float, str], None]
CancelFn = Callable[[], bool]
LOG_DIR = "logs"


@dataclass
class Case:
    path: Path
    stem: str


@dataclass
class CaseOutcome:
    case: Case
    status: str  # done | skipped | failed | cancelled
    reason: str = ""
    info: dict = field(default_factory=dict)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- per-case log
class CaseLog:
    """Append-only, timestamped log of one case (one file per case, all runs appended)."""

    def __init__(self, outdir: Path | None, stem: str) -> None:
        self.path = None if outdir is None else Path(outdir) / LOG_DIR / f"{stem}.log"
        self._last = ""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        if self.path is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as fh:
            for line in str(text).rstrip().splitlines() or [""]:
                fh.write(f"{stamp} {line}\n")

    def progress(self, frac: float, msg: str) -> None:
        if msg != self._last:  # DDIM steps report a few messages per case; repeats are noise
            self._last = msg
            self.write(f"{100 * frac:5.1f}% {msg}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- one case
def process_case(
    case: Case,
    outdir: Path,
    settings: Any,
    *,
    cohort: bool,
    overwrite: bool = False,
    cancel: CancelFn | None = None,
    progress: ProgressFn | None = None,
    expected_model: str | None = None,
    timeout_s: float | None = None,
) -> CaseOutcome:
    """Segment ``case`` into ``outdir`` unless its outputs are already complete.

    ``cohort`` adds what several cases need: the per-case log, ``S_case.json`` and
    ``S_overlay.png`` (a single-case run writes only the outputs and ``S_provenance.json``).  In a cohort the
    uncertainty is always computed in memory (cheap: one more interpolated channel) so that the
    per-structure mean uncertainty is known; the map is only written with ``--uncertainty``.

    ``expected_model``: the model's SHA256 as the driver saw it when the run started; a case whose
    worker finds another file (replaced during the run, or another copy on a cluster node) is
    refused, so one cohort never mixes two models.  ``timeout_s``: the case is stopped at its next
    cancellation point once it has run this long, and fails saying so.
    """
    outdir = Path(outdir)
    log = CaseLog(outdir if cohort else None, case.stem)
    t0 = time.time()
    if timeout_s:
        cancel = _Deadline(cancel, time.monotonic() + timeout_s)
    if cancel is not None and cancel():
        return CaseOutcome(case, "cancelled", "not started")
    try:
        found = assess_case(case, outdir, settings)
    except FileNotFoundError:
        return CaseOutcome(case, "failed", f"{case.path}: file not found")
    except OSError as exc:
        return CaseOutcome(case, "failed", f"{case.path}: cannot be read ({exc.strerror or exc})")
    if expected_model and found.identity is not None and found.identity.model_sha256 != expected_model:
        reason = _model_mismatch(settings, found.identity.model_sha256, expected_model)
        log.write(f"refused: {reason}")
        return CaseOutcome(case, "failed", reason)
    if found.state == "foreign" and not overwrite:
        reason = f"{found.reason}: kept; run with --overwrite to replace (a dated backup is kept)"
        log.write(f"refused: {reason}")
        return CaseOutcome(case, "failed", reason)
    if found.state == "current" and not overwrite:
        from msdseg.outputs.sidecar import rebuild_sidecar, sidecar_valid

        if not cohort or sidecar_valid(outdir, case.stem):
            return CaseOutcome(case, "skipped", "outputs already complete")
        try:
            from msdseg.core.labels import load_tree

            rebuild_sidecar(outdir, case.stem, case.path, settings, load_tree())
            log.write("outputs complete, sidecar missing or stale: rebuilt it from the outputs")
            return CaseOutcome(case, "skipped", "outputs already complete (sidecar rebuilt)")
        except Exception as exc:  # noqa: BLE001 - unreadable outputs: segment again
            log.write(f"could not rebuild the sidecar ({_one_line(exc)}); segmenting again")
    if found.state == "stale":
        log.write(f"segmenting again: {found.reason}")
    log.write(f"start {case.path} on {socket.gethostname()} pid {os.getpid()} settings {settings}")

    def report(frac: float, msg: str) -> None:
        log.progress(frac, msg)
        if progress is not None:
            progress(frac, msg)

    try:
        info = _segment_and_write(case, outdir, settings, cohort, report, cancel, found)
    except Cancelled:
        if getattr(cancel, "expired", False):
            reason = f"timed out after {timeout_s:g} s (the per-case limit); nothing written"
            log.write(f"failed: {reason}")
            return CaseOutcome(case, "failed", reason, seconds=time.time() - t0)
        log.write("cancelled: nothing written")
        return CaseOutcome(case, "cancelled", "stopped while running", seconds=time.time() - t0)
    except (InputError, FileNotFoundError) as exc:
        log.write(f"failed: {exc}")
        return CaseOutcome(case, "failed", str(exc), seconds=time.time() - t0)
    except Exception as exc:  # noqa: BLE001 - one bad case must not stop the cohort
        log.write(f"failed: {_one_line(exc)}\n{traceback.format_exc()}")
        return CaseOutcome(case, "failed", _one_line(exc), seconds=time.time() - t0)
    log.write(f"done in {time.time() - t0:.1f} s")
    return CaseOutcome(case, "done", info=info, seconds=time.time() - t0)


class _Deadline:
    """A cancel callback that also turns true after a deadline, and remembers that it did."""

    def __init__(self, cancel: CancelFn | None, deadline: float) -> None:
        self.cancel, self.deadline, self.expired = cancel, deadline, False

    def __call__(self) -> bool:
        if time.monotonic() >= self.deadline:
            self.expired = True
            return True
        return self.cancel is not None and bool(self.cancel())


def _model_mismatch(settings: Any, found: str, expected: str) -> str:
    where = f"{settings.model}" if getattr(settings, "model", None) else "the shipped model"
    host = socket.gethostname()
    if found == "untrained":
        return f"model file {where} not found on {host}; every worker needs the same model file"
    return (f"model file {where} on {host} is not the one this run started with (SHA256 {found[:12]}..., "
            f"expected {expected[:12]}...); every worker needs the same, unchanged model file")


def case_files(stem: str) -> set[str]:
    """Every final file name a case may write (outputs, provenance, sidecar, overlay)."""
    from msdseg.outputs.provenance import provenance_name
    from msdseg.outputs.sidecar import overlay_name, sidecar_name
    from msdseg.outputs.writers import output_names

    return {*output_names(stem).values(), provenance_name(stem), sidecar_name(stem), overlay_name(stem)}


def assess_case(case: Case, outdir: Path, settings: Any) -> "Assessment":
    """How the outputs already in ``outdir`` relate to segmenting ``case`` with ``settings``
    (:func:`msdseg.outputs.provenance.assess`); reads the input and the outputs to hash them."""
    from msdseg.outputs.provenance import RunIdentity, assess
    from msdseg.outputs.writers import output_names

    expected = ["labels", "segmentation", "volumes"] + (["uncertainty"] if settings.uncertainty else [])
    return assess(outdir, case.stem, output_names(case.stem), RunIdentity.of(case.path, settings), expected)


def _segment_and_write(case: Case, outdir: Path, settings: Any, cohort: bool, report: ProgressFn,
                       cancel: CancelFn | None, found: "Assessment") -> dict:
    from msdseg.inference.pipeline import segment_image
    from msdseg.core.io import load_volume
    from msdseg.outputs.writers import case_volumes

    image = load_volume(case.path)
    run_settings = replace(settings, uncertainty=True) if cohort else settings
    result = segment_image(image, run_settings, progress=report, cancel=cancel)
    to_write = result if settings.uncertainty else replace(result, uncertainty=None)
    if not cohort:
        _replace_outputs(to_write, outdir, case, found)
        return dict(result.info)
    from msdseg.outputs.sidecar import build_sidecar, case_measures, overlay_name, write_sidecar

    # everything the sidecar needs is computed first, so the two writes follow each other closely
    volumes = case_volumes(to_write)
    measures = case_measures(result.labels, volumes, result.tree, result.uncertainty)
    title = case.stem + ("" if result.info.get("trained", True) else " (UNTRAINED MODEL)")
    try:  # matplotlib may be missing (3D Slicer ships none): the case is still good without a picture
        from msdseg.outputs.thumbnail import render_thumbnail

        png: bytes | None = render_thumbnail(image, result.labels, result.tree, result.uncertainty, title)
    except Exception:  # noqa: BLE001 - a missing thumbnail must not fail a good segmentation
        png = None
    written = _replace_outputs(to_write, outdir, case, found)
    outputs = {k: p.name for k, p in written.items()}
    if png is not None:
        outputs["overlay"] = overlay_name(case.stem)
    doc = build_sidecar(case.stem, case.path, settings, result.info, volumes, measures, outputs)
    write_sidecar(outdir, case.stem, doc, png)
    return dict(result.info)


def _replace_outputs(result: Any, outdir: Path, case: Case, found: "Assessment") -> dict[str, Path]:
    """Write the case's outputs with their provenance; a person's files (only reached with
    ``--overwrite``) are first kept as dated backups, and earlier outputs this run does not write
    again (an uncertainty map of another seed) are removed so nothing stale stays beside the new."""
    from msdseg.outputs.provenance import back_up
    from msdseg.outputs.writers import write_case_outputs

    if found.foreign:
        back_up(outdir, found.foreign)
    written = write_case_outputs(result, outdir, case.stem, found.identity, case.path)
    for name in [*found.ours.values(), *found.foreign]:
        path = outdir / name
        if path not in written.values():
            path.unlink(missing_ok=True)
    return written


# ----------------------------------------------------------------------------- worker threads
def worker_threads(jobs: int) -> int:
    """PyTorch threads per worker: the machine's cores split over ``jobs`` (OMP_NUM_THREADS caps it)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, jobs))
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        threads = min(threads, int(env))
    return threads


def set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set or parallel work already started
        pass
