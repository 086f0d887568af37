"""Send cohort cases to an existing Dask distributed cluster (``msdseg segment --dask ADDRESS``).

Why Dask: one client API reaches a laptop's ``LocalCluster``, a SLURM/PBS/SGE allocation
(``dask-jobqueue``) or Kubernetes (``dask-kubernetes`` / the Dask Helm chart) -- see
``docs/cohorts.md``.  The driver stays in charge of everything that must be consistent: which
cases are complete (resume), the cohort CSVs and the report.  Workers only run
:func:`msdseg.batch.workers.process_case`, which writes a case's outputs atomically to the shared output
folder, so a Dask run leaves exactly the files a local run does.

Requirements: every worker has the same ``msdseg`` installed and sees the inputs, the output folder
and the model file under the same absolute paths (a shared file system).  A relative ``--model`` is
made absolute here, on the client (a worker's working folder is anyone's guess), and every case
checks on its worker that the model file there has the SHA256 the client saw: a node with another
copy of the model refuses its cases with one line instead of mixing two models in one cohort.

Each worker process loads the model once (:func:`msdseg.inference.pipeline.get_model` caches per process)
and picks a GPU when it has one (``--device auto``).  PyTorch threads per worker process:
``MSDSEG_TORCH_THREADS`` if set, else the cores the process may use divided by the worker's Dask
threads -- Dask's nanny sets ``OMP_NUM_THREADS=1`` in workers, which would otherwise leave a 32-core
node running one thread.

Faults are reported per case; none ends the run:

* outcomes are taken with ``distributed.as_completed`` as they finish;
* a task that raises (the case could not be deserialised on the worker, msdseg is missing there) is
  retried once by Dask (``retries=1``); a worker that dies is handled by the scheduler, which moves
  the case to another worker and gives up after its ``allowed-failures`` (``KilledWorker``);
* a result the client cannot read back fails that case only;
* per-case time limit (``timeout_s``): the case stops at its next cancellation point on the worker
  and fails as timed out; a case that never reaches one (stuck reading a file, say) is given up by
  the client, its task cancelled, :data:`BACKSTOP_FACTOR` times the limit plus
  :data:`BACKSTOP_GRACE_S` after the scheduler first showed it running.

Cancellation: a named :class:`distributed.Event`; running cases poll it (at most once a second)
through ``segment_image``'s ``cancel`` callback and stop at the next diffusion step, queued cases
see it as soon as they start and return at once.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from msdseg.batch.workers import CancelFn, Case, CaseOutcome, process_case, set_torch_threads

#: A case the scheduler has shown running for this many times the time limit, plus the grace, is
#: given up by the client: its worker never reached a cancellation point.
BACKSTOP_FACTOR = 2.0
BACKSTOP_GRACE_S = 60.0
TASK_RETRIES = 1
_THREADS_CONFIGURED = False


def _configure_worker_threads() -> None:
    """Once per worker process: PyTorch threads (see the module doc)."""
    global _THREADS_CONFIGURED
    if _THREADS_CONFIGURED:
        return
    env = os.environ.get("MSDSEG_TORCH_THREADS", "")
    if env.isdigit() and int(env) > 0:
        threads = int(env)
    else:
        try:
            from distributed import get_worker

            per_process = max(1, int(get_worker().state.nthreads))
        except Exception:  # noqa: BLE001 - not inside a worker (tests calling directly)
            per_process = 1
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        threads = max(1, cores // per_process)
    set_torch_threads(threads)
    _THREADS_CONFIGURED = True


def settings_for_workers(settings: Any) -> Any:
    """The settings with an absolute model path, resolved here on the client."""
    model = getattr(settings, "model", None)
    if model and not Path(model).is_absolute():
        return replace(settings, model=str(Path(model).resolve()))
    return settings


def dask_case_task(case: Case, outdir: str, settings: Any, options: dict, event_name: str) -> CaseOutcome:
    """What a Dask worker runs for one case (``options``: process_case's keyword options)."""
    from distributed import Event

    _configure_worker_threads()
    event = Event(event_name)
    state = {"checked": 0.0, "set": False}

    def cancelled() -> bool:
        now = time.monotonic()
        if not state["set"] and now - state["checked"] >= 1.0:
            state["checked"] = now
            state["set"] = bool(event.is_set())
        return state["set"]

    return process_case(case, Path(outdir), settings, cancel=cancelled, **options)


def _one_line(exc: BaseException) -> str:
    """Dask's messages run over several lines: join them, and keep the start."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:240]}" if text else type(exc).__name__


def _failure(fut: Any) -> str:
    """One line for a task that erred or whose result cannot be read."""
    try:
        exc = fut.exception()
    except Exception as err:  # noqa: BLE001 - the exception itself may not deserialise
        return f"Dask task failed and its error could not be read: {_one_line(err)}"
    return f"Dask task failed: {_one_line(exc)}" if exc else "Dask task failed"


class _Backstop:
    """Gives up cases that run past ``BACKSTOP_FACTOR`` x the limit (see the module doc).

    A worker lists as processing both the case it runs and the ones waiting for its thread, so per
    worker only the case seen longest is given up, and the clocks of the others there start again.
    """

    def __init__(self, client: Any, timeout_s: float | None) -> None:
        self.client, self.timeout_s = client, timeout_s
        self.first_seen: dict[str, float] = {}
        self.checked = 0.0

    def overdue(self, pending: set) -> list:
        if not self.timeout_s or time.monotonic() - self.checked < 1.0:
            return []
        self.checked = now = time.monotonic()
        try:
            processing = self.client.processing()
        except Exception:  # noqa: BLE001 - the scheduler is busy or gone: the next look decides
            return []
        ours = {fut.key: fut for fut in pending}
        late = []
        for keys in processing.values():
            here = [key for key in keys if key in ours]
            if not here:
                continue
            for key in here:
                self.first_seen.setdefault(key, now)
            oldest = min(here, key=lambda key: self.first_seen[key])
            if now - self.first_seen[oldest] > BACKSTOP_FACTOR * self.timeout_s + BACKSTOP_GRACE_S:
                late.append(ours[oldest])
                self.first_seen.update({key: now for key in here if key != oldest})
        return late


def run_dask(cases: Sequence[Case], outdir: Path, settings: Any, *, address: str, cohort: bool,
             overwrite: bool, stop: CancelFn, expected_model: str | None = None, timeout_s: float | None = None,
             connect_timeout: str = "30s") -> Iterator[CaseOutcome]:
    """Yield each case's outcome as it finishes on the cluster at ``address``."""
    try:
        from distributed import Client, Event
    except ImportError as exc:  # pragma: no cover - depends on the installation
        from msdseg.core.errors import InputError

        raise InputError('--dask needs Dask distributed: pip install "msdseg[dask]"') from exc

    settings = settings_for_workers(settings)
    options = {"cohort": cohort, "overwrite": overwrite, "expected_model": expected_model, "timeout_s": timeout_s}
    token = uuid.uuid4().hex[:10]
    event_name = f"msdseg-cancel-{token}"
    client = Client(address, timeout=connect_timeout, set_as_default=False)
    try:
        event = Event(event_name, client=client)
        outdir_abs = str(Path(outdir).resolve())
        futures: dict[Any, Case] = {}
        for case in cases:
            path = Path(case.path)
            sent = replace(case, path=path.resolve() if path.exists() else path)
            try:
                fut = client.submit(dask_case_task, sent, outdir_abs, settings, options, event_name,
                                    key=f"msdseg-{case.stem}-{token}", pure=False, retries=TASK_RETRIES)
            except Exception as exc:  # noqa: BLE001 - e.g. this case cannot be serialised
                yield CaseOutcome(case, "failed", f"could not be sent to the cluster: {_one_line(exc)}")
                continue
            futures[fut] = case
        yield from _collect(client, futures, event, stop, timeout_s)
    finally:
        client.close()


def _collect(client: Any, futures: dict, event: Any, stop: CancelFn, timeout_s: float | None) -> Iterator[CaseOutcome]:
    from distributed import as_completed

    pending = set(futures)
    finished = as_completed(list(futures), loop=client.loop)
    backstop = _Backstop(client, timeout_s)
    signalled = False
    while pending:
        if not signalled and stop():
            event.set()
            signalled = True
        for fut in backstop.overdue(pending):
            pending.discard(fut)
            fut.cancel()
            yield CaseOutcome(futures[fut], "failed", f"timed out after {timeout_s:g} s (the per-case limit); "
                              "its worker did not stop and the task was cancelled")
        batch = finished.next_batch(block=False) if finished.has_ready() else []
        for fut in batch:
            if fut not in pending:
                continue  # given up by the backstop already
            pending.discard(fut)
            yield _outcome(fut, futures[fut])
        if pending and not batch:
            time.sleep(0.2)


def _outcome(fut: Any, case: Case) -> CaseOutcome:
    if fut.status == "cancelled":
        return CaseOutcome(case, "cancelled", "not started")
    if fut.status != "finished":
        return CaseOutcome(case, "failed", _failure(fut))
    try:
        outcome = fut.result()
    except Exception as exc:  # noqa: BLE001 - e.g. the result cannot be deserialised here
        return CaseOutcome(case, "failed", f"the worker's result could not be read back: {_one_line(exc)}")
    if not isinstance(outcome, CaseOutcome):
        return CaseOutcome(case, "failed", f"the worker returned {type(outcome).__name__}, not a case outcome")
    outcome.case = case  # report the driver's view of the path
    return outcome
