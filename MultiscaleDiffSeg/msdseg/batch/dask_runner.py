"""Send cohort cases to an existing Dask distributed cluster (``msdseg segment --dask ADDRESS``).

Why Dask: one client API reaches a laptop's ``LocalCluster``, a SLURM/PBS/SGE allocation
(``dask-jobqueue``) or Kubernetes (``dask-kubernetes`` / the Dask Helm chart) -- see
``docs/cohorts.md``.  The driver stays in charge of everything that must be consistent: which
cases are complete (resume), the cohort CSVs and the report.  Workers only run
:func:`msdseg.batch.workers.process_case`, which writes a case's outputs atomically to the shared output
folder, so a Dask run leaves exactly the files a local run does.

Requirements: every worker has the same ``msdseg`` installed and sees the inputs and the output
folder under the same absolute paths (a shared file system).  Each worker process loads the model
once (:func:`msdseg.inference.pipeline.get_model` caches per process) and picks a GPU when it has one
(``--device auto``).  PyTorch threads per worker process: ``MSDSEG_TORCH_THREADS`` if set, else
the cores the process may use divided by the worker's Dask threads -- Dask's nanny sets
``OMP_NUM_THREADS=1`` in workers, which would otherwise leave a 32-core node running one thread.

Cancellation: a named :class:`distributed.Event`; running cases poll it (at most once a second)
through ``segment_image``'s ``cancel`` callback and stop at the next diffusion step, queued cases
see it as soon as they start and return at once.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from msdseg.batch.workers import CancelFn, Case, CaseOutcome, process_case, set_torch_threads

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


def dask_case_task(case: Case, outdir: str, settings: Any, cohort: bool, overwrite: bool,
                   event_name: str) -> CaseOutcome:
    """What a Dask worker runs for one case."""
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

    return process_case(case, Path(outdir), settings, cohort=cohort, overwrite=overwrite, cancel=cancelled)


def run_dask(cases: Sequence[Case], outdir: Path, settings: Any, *, address: str, cohort: bool,
             overwrite: bool, stop: CancelFn, connect_timeout: str = "30s") -> Iterator[CaseOutcome]:
    """Yield each case's outcome as it finishes on the cluster at ``address``."""
    try:
        from distributed import Client, Event
    except ImportError as exc:  # pragma: no cover - depends on the installation
        from msdseg.core.errors import InputError

        raise InputError('--dask needs Dask distributed: pip install "msdseg[dask]"') from exc

    token = uuid.uuid4().hex[:10]
    event_name = f"msdseg-cancel-{token}"
    client = Client(address, timeout=connect_timeout, set_as_default=False)
    try:
        event = Event(event_name, client=client)
        outdir_abs = str(Path(outdir).resolve())
        futures = {}
        for case in cases:
            abs_case = Case(Path(case.path).resolve() if Path(case.path).exists() else Path(case.path), case.stem)
            fut = client.submit(dask_case_task, abs_case, outdir_abs, settings, cohort, overwrite, event_name,
                                key=f"msdseg-{case.stem}-{token}", pure=False)
            futures[fut] = case
        pending = set(futures)
        signalled = False
        while pending:
            if not signalled and stop():
                event.set()
                signalled = True
            finished = [f for f in pending if f.done()]
            for fut in finished:
                pending.discard(fut)
                case = futures[fut]
                if fut.status == "finished":
                    outcome = fut.result()
                    outcome.case = case  # report the driver's view of the path
                    yield outcome
                elif fut.status == "cancelled":
                    yield CaseOutcome(case, "cancelled", "not started")
                else:
                    try:
                        exc = fut.exception()
                        reason = f"Dask worker failure: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    except Exception as err:  # noqa: BLE001
                        reason = f"Dask worker failure: {err}"
                    yield CaseOutcome(case, "failed", reason)
            if pending and not finished:
                time.sleep(0.2)
    finally:
        client.close()
