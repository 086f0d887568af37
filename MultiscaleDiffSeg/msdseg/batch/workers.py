"""One case from input file to finished outputs, and the local process pool that runs many.

:func:`process_case` is the only code that touches a case; the in-process loop, the local pool
and Dask workers all call it, so resume, failure isolation and the sidecar behave identically
whatever runs the cohort.  It never raises for a bad case: it returns a :class:`CaseOutcome`
whose reason is one line, with the full traceback in the case's log (``OUTDIR/logs/S.log``).

Local pool choices (why):

* ``concurrent.futures.ProcessPoolExecutor`` with the **forkserver** start method where it exists
  (Linux), else **spawn**: never ``fork`` from a process that may already run PyTorch threads.
  The fork server preloads :mod:`msdseg.inference.pipeline`, so PyTorch is imported once, not once per
  worker (importing it is a noticeable share of a case's time on a busy CPU).
* Each worker loads the model once (:func:`msdseg.inference.pipeline.get_model` caches per process) and
  uses ``max(1, cores // jobs)`` PyTorch threads (capped by ``OMP_NUM_THREADS`` when set), so
  ``--jobs`` divides the machine instead of oversubscribing it.
* Cancellation: workers ignore SIGINT (a Ctrl-C reaches the whole process group; the driver
  decides) and poll a shared event through ``segment_image``'s ``cancel`` callback, so a running
  case stops at its next diffusion step and writes nothing; a case already writing finishes.
* A worker that dies (out-of-memory kill, segfault) breaks the pool; the pool is rebuilt and the
  cases it was running are retried once, then reported as failed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, CancelledError, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

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
) -> CaseOutcome:
    """Segment ``case`` into ``outdir`` unless its outputs are already complete.

    ``cohort`` adds what several cases need: the per-case log, ``S_case.json`` and
    ``S_overlay.png`` (a single-case run writes only the outputs and ``S_provenance.json``).  In a cohort the
    uncertainty is always computed in memory (cheap: one more interpolated channel) so that the
    per-structure mean uncertainty is known; the map is only written with ``--uncertainty``.
    """
    outdir = Path(outdir)
    log = CaseLog(outdir if cohort else None, case.stem)
    t0 = time.time()
    if cancel is not None and cancel():
        return CaseOutcome(case, "cancelled", "not started")
    try:
        found = assess_case(case, outdir, settings)
    except FileNotFoundError:
        return CaseOutcome(case, "failed", f"{case.path}: file not found")
    except OSError as exc:
        return CaseOutcome(case, "failed", f"{case.path}: cannot be read ({exc.strerror or exc})")
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


# ----------------------------------------------------------------------------- local pool
_POOL_CANCEL: Any = None  # multiprocessing Event shared with the driver
_TERMINATED = False


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


def _on_sigterm(signum: int, frame: Any) -> None:
    global _TERMINATED
    _TERMINATED = True


def _init_pool_worker(threads: int, cancel_event: Any) -> None:
    global _POOL_CANCEL
    _POOL_CANCEL = cancel_event
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    set_torch_threads(threads)


def _pool_cancelled() -> bool:
    return _TERMINATED or (_POOL_CANCEL is not None and _POOL_CANCEL.is_set())


def _pool_task(case: Case, outdir: Path, settings: Any, cohort: bool, overwrite: bool) -> CaseOutcome:
    return process_case(case, outdir, settings, cohort=cohort, overwrite=overwrite, cancel=_pool_cancelled)


def pool_context() -> mp.context.BaseContext:
    """forkserver (PyTorch imported once, in the server) where available, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["msdseg.inference.pipeline", "msdseg.batch.workers"])
        return ctx
    return mp.get_context("spawn")


def run_local_pool(cases: Sequence[Case], outdir: Path, settings: Any, *, jobs: int, cohort: bool,
                   overwrite: bool, stop: CancelFn, max_retries: int = 1) -> Iterator[CaseOutcome]:
    """Yield each case's outcome as it finishes; after ``stop()`` turns true, running cases are
    cancelled at their next diffusion step and queued ones return ``cancelled`` at once."""
    ctx = pool_context()
    cancel_event = ctx.Event()
    threads = worker_threads(jobs)
    queue = list(cases)
    attempts: dict[str, int] = {}
    while queue:
        with ProcessPoolExecutor(max_workers=min(jobs, len(queue)), mp_context=ctx,
                                 initializer=_init_pool_worker, initargs=(threads, cancel_event)) as pool:
            futures = {pool.submit(_pool_task, c, outdir, settings, cohort, overwrite): c for c in queue}
            queue = []
            pending = set(futures)
            while pending:
                if stop() and not cancel_event.is_set():
                    cancel_event.set()
                    for f in pending:
                        f.cancel()  # only cases no worker has taken yet
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for fut in done:
                    case = futures[fut]
                    try:
                        yield fut.result()
                    except CancelledError:
                        yield CaseOutcome(case, "cancelled", "not started")
                    except BrokenProcessPool:
                        attempts[case.stem] = attempts.get(case.stem, 0) + 1
                        if attempts[case.stem] <= max_retries and not stop():
                            queue.append(case)
                        else:
                            yield CaseOutcome(case, "failed", "worker process died (killed, e.g. out of memory?)")
                    except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
                        yield CaseOutcome(case, "failed", _one_line(exc))
