"""The local process pool behind ``msdseg segment --jobs N``: N worker processes, one case each.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies (an out-of-memory
kill, a segfault) the whole executor breaks, and every pending future fails with
``BrokenProcessPool`` -- cases no worker had started and cases that healthy workers were running
alike.  Here each worker is a process with its own pipe, and the driver knows which case each one
runs, so:

* a worker that dies charges only the case it was running.  That case is retried once, at the end
  of the queue (an out-of-memory case then runs beside fewer others), and fails on its second death
  with one line naming the signal (``worker process died (signal 9, SIGKILL: ...)``).  A new worker
  takes the dead one's place; the other workers and the queued cases never notice.  The dead
  worker's hidden temporaries for that case are cleaned at once (``remove_stale_temporaries``);
* a case still running after the per-case limit plus a grace period (it did not reach a
  cancellation point) has its worker killed and fails as timed out;
* cancellation: workers ignore SIGINT (a Ctrl-C reaches the whole process group; the driver
  decides) and poll a shared event through ``segment_image``'s ``cancel`` callback, so a running
  case stops at its next diffusion step and writes nothing; a case already writing finishes.  A
  worker also stops its case when the driver's end of the pipe closes (the driver died);
* start method **forkserver** where it exists (Linux), else **spawn**: never ``fork`` from a process
  that may already run PyTorch threads.  The fork server preloads :mod:`msdseg.inference.pipeline`,
  so PyTorch is imported once, not once per worker (a noticeable share of a case on a busy CPU);
* each worker loads the model once (:func:`msdseg.inference.pipeline.get_model` caches per
  process) and uses ``max(1, cores // jobs)`` PyTorch threads (capped by ``OMP_NUM_THREADS``), so
  ``--jobs`` divides the machine instead of oversubscribing it.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Iterator, Sequence

from msdseg.core.allocator import keep_freed_memory
from msdseg.batch.workers import (CancelFn, Case, CaseLog, CaseOutcome, case_files, process_case, set_torch_threads,
                                  worker_threads)

#: A case past its time limit gets this much longer to reach a cancellation point before its worker is killed.
KILL_GRACE_S = 60.0
_CANCEL: Any = None  # the driver's multiprocessing Event, in a worker
_CONN: Connection | None = None  # the worker's end of its pipe
_TERMINATED = False


# ----------------------------------------------------------------------------- in a worker
def _on_sigterm(signum: int, frame: Any) -> None:
    global _TERMINATED
    _TERMINATED = True


def _cancelled() -> bool:
    if _TERMINATED or (_CANCEL is not None and _CANCEL.is_set()):
        return True
    try:  # nothing arrives while a case runs unless the driver has gone (end of file)
        return _CONN is not None and _CONN.poll()
    except (OSError, EOFError):
        return True


def worker_main(conn: Connection, threads: int, cancel_event: Any) -> None:
    """A worker process: take a case from the pipe, run it, send the outcome back; until told to stop."""
    global _CANCEL, _CONN
    _CANCEL, _CONN = cancel_event, conn
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    keep_freed_memory()  # a pool worker is msdseg's own process (msdseg.core.allocator)
    set_torch_threads(threads)
    while not _TERMINATED:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        case, outdir, settings, options = task
        outcome = process_case(case, outdir, settings, cancel=_cancelled, **options)
        try:
            conn.send(outcome)
        except (OSError, EOFError):
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be pickled
            conn.send(CaseOutcome(case, "failed", f"result could not be passed back: {type(exc).__name__}: {exc}"))


# ----------------------------------------------------------------------------- in the driver
def pool_context() -> mp.context.BaseContext:
    """forkserver (PyTorch imported once, in the server) where available, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["msdseg.inference.pipeline", "msdseg.batch.pool"])
        return ctx
    return mp.get_context("spawn")


@dataclass
class _Worker:
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    case: Case | None = None
    started: float = 0.0
    timed_out: bool = False


def death_reason(exitcode: int | None) -> str:
    """``worker process died (signal 9, SIGKILL: ...)`` from a process's exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "unknown signal"
        why = ": killed, e.g. for lack of memory" if -exitcode == signal.SIGKILL else ""
        return f"worker process died (signal {-exitcode}, {name}{why})"
    if exitcode:
        return f"worker process died (exit code {exitcode})"
    return "worker process ended without passing back a result"


class LocalPool:
    """The driver's side: starts, feeds, watches and replaces the workers (see the module doc)."""

    def __init__(self, outdir: Path, settings: Any, options: dict, *, jobs: int, stop: CancelFn,
                 max_retries: int, timeout_s: float | None) -> None:
        self.ctx = pool_context()
        self.cancel_event = self.ctx.Event()
        self.threads = worker_threads(jobs)
        self.outdir, self.settings, self.options = Path(outdir), settings, options
        self.jobs, self.stop, self.max_retries, self.timeout_s = jobs, stop, max_retries, timeout_s
        self.workers: list[_Worker] = []
        self.queue: deque[Case] = deque()
        self.deaths: dict[str, int] = {}

    def run(self, cases: Sequence[Case]) -> Iterator[CaseOutcome]:
        self.queue.extend(cases)
        try:
            while self.queue or self._busy():
                if self.stop() and not self.cancel_event.is_set():
                    self.cancel_event.set()
                if self.cancel_event.is_set():
                    while self.queue:
                        yield CaseOutcome(self.queue.popleft(), "cancelled", "not started")
                yield from self._hand_out()
                self._kill_overdue()
                busy = self._busy()
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=0.25))
                for w in busy:
                    yield from self._collect(w, ready)
        finally:
            self._shut_down()

    # ------------------------------------------------------------------ steps
    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers if w.case is not None]

    def _hand_out(self) -> Iterator[CaseOutcome]:
        for w in list(self.workers):  # idle workers that died meanwhile cost no case: drop them
            if w.case is None and not w.process.is_alive():
                self._drop(w)
        while self.queue and not self.cancel_event.is_set():
            idle = next((w for w in self.workers if w.case is None), None)
            if idle is None and len(self.workers) < self.jobs:
                try:
                    idle = self._start_worker()
                except OSError as exc:  # cannot fork (no memory?): go on with the workers there are
                    if self.workers:
                        return
                    while self.queue:
                        yield CaseOutcome(self.queue.popleft(), "failed", f"cannot start a worker process: {exc}")
                    return
            if idle is None:
                return
            case = self.queue.popleft()
            try:
                idle.conn.send((case, self.outdir, self.settings, self.options))
            except (OSError, EOFError):  # it died before taking the case: the case was never started
                self.queue.appendleft(case)
                self._drop(idle)
                continue
            except Exception as exc:  # noqa: BLE001 - a case that cannot be pickled
                yield CaseOutcome(case, "failed", f"cannot be passed to a worker: {type(exc).__name__}: {exc}")
                continue
            idle.case, idle.started, idle.timed_out = case, time.monotonic(), False

    def _start_worker(self) -> _Worker:
        mine, theirs = self.ctx.Pipe(duplex=True)
        process = self.ctx.Process(target=worker_main, args=(theirs, self.threads, self.cancel_event),
                                   name="msdseg-worker", daemon=True)
        process.start()
        theirs.close()
        worker = _Worker(process, mine)
        self.workers.append(worker)
        return worker

    def _kill_overdue(self) -> None:
        if not self.timeout_s:
            return
        now = time.monotonic()
        for w in self._busy():
            if not w.timed_out and now - w.started > self.timeout_s + KILL_GRACE_S:
                w.timed_out = True
                w.process.kill()

    def _collect(self, w: _Worker, ready: set) -> Iterator[CaseOutcome]:
        """The outcome a worker sent, or what its death means for its case."""
        case = w.case
        assert case is not None
        if w.conn in ready or (w.process.sentinel in ready and _poll(w.conn)):
            try:
                outcome = w.conn.recv()
            except Exception:  # noqa: BLE001 - died while sending: handled as a death below
                outcome = None
            if isinstance(outcome, CaseOutcome):
                w.case = None
                yield outcome
                return
        if w.process.sentinel not in ready and w.process.is_alive():
            return
        w.process.join(1.0)
        self._drop(w)
        yield from self._dead(case, w)

    def _dead(self, case: Case, w: _Worker) -> Iterator[CaseOutcome]:
        from msdseg.core.atomic import remove_stale_temporaries

        remove_stale_temporaries(self.outdir, older_than_s=0.0, names=case_files(case.stem))
        log = CaseLog(self.outdir if self.options.get("cohort") else None, case.stem)
        if w.timed_out:
            reason = (f"timed out after {self.timeout_s:g} s (the per-case limit); its worker did not stop "
                      f"within {KILL_GRACE_S:g} s more and was killed")
            log.write(f"failed: {reason}")
            yield CaseOutcome(case, "failed", reason, seconds=time.monotonic() - w.started)
            return
        reason = death_reason(w.process.exitcode)
        self.deaths[case.stem] = self.deaths.get(case.stem, 0) + 1
        tries = self.deaths[case.stem]
        if tries <= self.max_retries and not self.cancel_event.is_set():
            log.write(f"{reason} (pid {w.process.pid}) while running this case; it will be tried again")
            self.queue.append(case)
            return
        if tries > 1:
            reason += f"; tried {tries} times"
        log.write(f"failed: {reason}")
        yield CaseOutcome(case, "failed", reason, seconds=time.monotonic() - w.started)

    def _drop(self, w: _Worker) -> None:
        if w in self.workers:
            self.workers.remove(w)
        w.conn.close()

    def _shut_down(self) -> None:
        """Ask idle workers to leave; cancel, then terminate, any still running a case."""
        if self._busy():
            self.cancel_event.set()
        for w in self.workers:
            if w.case is None:
                try:
                    w.conn.send(None)
                except (OSError, EOFError):
                    pass
            w.conn.close()  # a busy worker sees the closed pipe as a cancel too
        deadline = time.monotonic() + 5.0
        for w in self.workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(2.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
        self.workers.clear()


def _poll(conn: Connection) -> bool:
    try:
        return conn.poll()
    except (OSError, EOFError):
        return False


def run_local_pool(cases: Sequence[Case], outdir: Path, settings: Any, *, jobs: int, cohort: bool,
                   overwrite: bool, stop: CancelFn, max_retries: int = 1, expected_model: str | None = None,
                   timeout_s: float | None = None) -> Iterator[CaseOutcome]:
    """Yield each case's outcome as it finishes; after ``stop()`` turns true, running cases are
    cancelled at their next diffusion step and queued ones return ``cancelled`` at once."""
    options = {"cohort": cohort, "overwrite": overwrite, "expected_model": expected_model, "timeout_s": timeout_s}
    pool = LocalPool(outdir, settings, options, jobs=jobs, stop=stop, max_retries=max_retries, timeout_s=timeout_s)
    yield from pool.run(cases)
