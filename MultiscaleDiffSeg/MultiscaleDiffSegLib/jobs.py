"""One segmentation from start to result nodes, and cohorts of files; Qt-free.

``SegmentationJob``: input volume -> temporary ``input.nrrd`` -> worker process (the core CLI) ->
``input_labels.nii.gz`` (+ uncertainty) -> :func:`mrml.import_results`.  ``CohortJob``: files ->
the core CLI with all of them -> per-case outputs in a folder (resumable, failures isolated by the
core).  Both are driven by polling (``poll`` from a Qt timer, or ``wait``), so that everything that
touches MRML happens on the caller's thread.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import SimpleITK as sitk

from . import mrml
from .process import BackgroundProcess, ProcessOutcome
from msdseg.core.settings import SegmentSettings

from .settings import INPUT_FILE_NAME, output_files, segment_command, worker_environment

ProgressCallback = Callable[[float, str], None]
LogCallback = Callable[[str], None]

#: Folder that holds ``msdseg`` (the module folder): put on the worker's PYTHONPATH.
MODULE_DIR = Path(__file__).resolve().parent.parent


@dataclass
class JobResult:
    """How a job ended; ``nodes`` for a single volume, ``cases`` for a cohort."""

    status: str  # done | failed | cancelled
    error: str = ""
    elapsed: float = 0.0
    nodes: mrml.ResultNodes | None = None
    cases: list["CaseResult"] = field(default_factory=list)
    outcome: ProcessOutcome | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"


@dataclass
class WorkerConfig:
    """How to start the worker: which Python, which environment, where temporary files go."""

    python: str
    module_dir: Path = MODULE_DIR
    env_base: Mapping[str, str] | None = None
    temp_root: str | None = None
    threads: int | None = None
    keep_temp: bool = False

    def environment(self) -> dict[str, str]:
        return worker_environment(self.module_dir, self.env_base, self.threads)


class _PollingJob:
    """Shared start/poll/wait/cancel plumbing around one :class:`BackgroundProcess`."""

    def __init__(self, on_progress: ProgressCallback | None, on_log: LogCallback | None,
                 on_done: Callable[[JobResult], None] | None) -> None:
        self.on_progress = on_progress
        self.on_log = on_log
        self.on_done = on_done
        self.process: BackgroundProcess | None = None
        self.result: JobResult | None = None
        self._t0 = 0.0

    @property
    def running(self) -> bool:
        return self.process is not None and self.result is None

    def poll(self) -> bool:
        """Deliver progress and finish when the worker ended; True while running."""
        if self.result is not None:
            return False
        if self.process is None:
            return False
        self.process.poll()
        return self.result is None

    def wait(self, interval: float = 0.1) -> JobResult:
        while self.poll():
            time.sleep(interval)
        assert self.result is not None
        return self.result

    def cancel(self, wait: bool = False) -> None:
        """Ask the worker to stop; without ``wait`` this returns at once and :meth:`poll` finishes it."""
        if self.process is not None and self.result is None:
            self._log("Cancelling: stopping the worker process and its children...")
            self.process.cancel(wait=wait)

    def _log(self, text: str) -> None:
        if self.on_log:
            self.on_log(text)

    def _progress(self, fraction: float, message: str) -> None:
        if self.on_progress:
            self.on_progress(fraction, message)

    def _finish(self, result: JobResult) -> None:
        result.elapsed = time.monotonic() - self._t0
        self.result = result
        if self.on_done:
            self.on_done(result)

    def _start_process(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        self._t0 = time.monotonic()
        self._log("Worker: " + " ".join(_quote(c) for c in command))
        self.process = BackgroundProcess(
            command, env=env, on_progress=self._on_worker_progress, on_log=self._log,
            on_finished=self._on_worker_finished,
        )
        self.process.start()

    def _on_worker_progress(self, fraction: float, message: str) -> None:
        self._progress(fraction, message)

    def _on_worker_finished(self, outcome: ProcessOutcome) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class SegmentationJob(_PollingJob):
    """Segment one volume node in a worker process and put the results into its scene."""

    def __init__(
        self,
        input_volume,
        settings: SegmentSettings,
        worker: WorkerConfig,
        segmentation_node=None,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        on_done: Callable[[JobResult], None] | None = None,
        command: Callable[[Path, Path], list[str]] | None = None,
    ) -> None:
        super().__init__(on_progress, on_log, on_done)
        self.input_volume = input_volume
        self.scene = input_volume.GetScene()
        self.settings = settings
        self.worker = worker
        self.segmentation_node = segmentation_node
        self._command = command
        self.temp_dir: Path | None = None

    def start(self) -> "SegmentationJob":
        """Write the input and start the worker (raises for an unusable input before starting)."""
        if self.scene is None:
            raise ValueError("the input volume is not in a scene")
        image = mrml.volume_to_sitk(self.input_volume)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="msdseg-", dir=self.worker.temp_root))
        input_path = self.temp_dir / INPUT_FILE_NAME
        self._progress(0.0, "writing the input volume")
        try:
            sitk.WriteImage(image, str(input_path), useCompression=False)
        except Exception:
            self._cleanup()
            raise
        out_dir = self.temp_dir / "out"
        if self._command is not None:
            command = self._command(input_path, out_dir)
        else:
            command = segment_command(self.worker.python, [input_path], out_dir, self.settings)
        self._start_process(command, self.worker.environment())
        return self

    def _on_worker_finished(self, outcome: ProcessOutcome) -> None:
        if outcome.cancelled:
            self._cleanup()
            self._finish(JobResult("cancelled", "cancelled by the user", outcome=outcome))
            return
        if not outcome.ok:
            self._cleanup()
            self._finish(JobResult("failed", outcome.error, outcome=outcome))
            return
        try:
            self._progress(1.0, "loading the results")
            nodes = self._import(self.temp_dir / "out")  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - reported to the user, never silent
            self._cleanup()
            self._finish(JobResult("failed", f"could not load the results: {exc}", outcome=outcome))
            return
        self._cleanup()
        self._finish(JobResult("done", nodes=nodes, outcome=outcome))

    def _import(self, out_dir: Path) -> mrml.ResultNodes:
        files = output_files(out_dir, Path(INPUT_FILE_NAME).stem)
        if not files["labels"].exists():
            raise FileNotFoundError(f"the worker wrote no {files['labels'].name}")
        labels = mrml.read_image(files["labels"])
        uncertainty = mrml.read_image(files["uncertainty"]) if files["uncertainty"].exists() else None
        if self.settings.uncertainty and uncertainty is None:
            self._log("Warning: an uncertainty map was requested but the worker did not write one.")
        info = {"preset": self.settings.preset, "device": self.settings.device, "seed": self.settings.seed}
        return mrml.import_results(self.scene, self.input_volume, labels, uncertainty,
                                   segmentation_node=self.segmentation_node, info=info)

    def _cleanup(self) -> None:
        if self.temp_dir is not None and not self.worker.keep_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- cohorts
@dataclass
class CaseResult:
    """One input file of a cohort run."""

    input: str
    stem: str
    status: str  # done | failed | missing
    reason: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


_CASE_PREFIX = re.compile(r"^\[(\d+)/(\d+)\]\s*")


def cohort_progress(fraction: float, message: str) -> tuple[float, str]:
    """Overall progress from the core's per-case ``[i/n] stem: message`` lines."""
    match = _CASE_PREFIX.match(message)
    if not match:
        return fraction, message
    index, total = int(match.group(1)), int(match.group(2))
    return ((index - 1) + fraction) / max(total, 1), message


class CohortJob(_PollingJob):
    """Segment files into a folder with the core CLI (resume and failure isolation are the core's)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        output_dir: str | os.PathLike,
        settings: SegmentSettings,
        worker: WorkerConfig,
        overwrite: bool = False,
        on_progress: ProgressCallback | None = None,
        on_log: LogCallback | None = None,
        on_done: Callable[[JobResult], None] | None = None,
    ) -> None:
        super().__init__(on_progress, on_log, on_done)
        self.paths = [str(p) for p in paths]
        self.output_dir = Path(output_dir)
        self.settings = settings
        self.worker = worker
        self.overwrite = overwrite

    def start(self) -> "CohortJob":
        if not self.paths:
            raise ValueError("no input files given")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        command = segment_command(self.worker.python, self.paths, self.output_dir, self.settings, self.overwrite)
        self._start_process(command, self.worker.environment())
        return self

    def _on_worker_progress(self, fraction: float, message: str) -> None:
        self._progress(*cohort_progress(fraction, message))

    def _on_worker_finished(self, outcome: ProcessOutcome) -> None:
        if outcome.cancelled:
            self._finish(JobResult("cancelled", "cancelled by the user", outcome=outcome,
                                   cases=self.case_results()))
            return
        cases = self.case_results()
        if len(cases) == 1 and cases[0].status != "done" and outcome.error:
            cases[0].reason = outcome.error  # the core writes cohort_failures.csv only for several cases
        status = "done" if outcome.ok else "failed"
        error = "" if outcome.ok else outcome.error
        if cases and all(c.status != "done" for c in cases) and outcome.ok:
            status, error = "failed", "no case produced outputs"
        self._finish(JobResult(status, error, cases=cases, outcome=outcome))

    def case_results(self) -> list[CaseResult]:
        """Per input: the output files that exist, or the core's failure reason."""
        from msdseg.batch.cohort import assign_stems, expand_inputs  # Qt-free core helpers

        try:
            cases = assign_stems(expand_inputs(self.paths))
        except Exception as exc:  # noqa: BLE001 - e.g. a pattern that matches nothing
            return [CaseResult(p, "", "failed", str(exc)) for p in self.paths]
        failures = read_failures(self.output_dir / "cohort_failures.csv")
        results = []
        for case in cases:
            files = output_files(self.output_dir, case.stem)
            present = {k: str(v) for k, v in files.items() if v.exists()}
            if "labels" in present:
                results.append(CaseResult(str(case.path), case.stem, "done", outputs=present))
            else:
                reason = failures.get(case.stem, "no outputs were written")
                results.append(CaseResult(str(case.path), case.stem, "failed" if case.stem in failures else "missing",
                                          reason, present))
        return results


def read_failures(path: Path) -> dict[str, str]:
    """stem -> reason from the core's ``cohort_failures.csv`` (empty when there is none)."""
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["case"]: row.get("reason", "") for row in csv.DictReader(handle)}


def _quote(text: str) -> str:
    return f'"{text}"' if " " in text else text


def load_case_into_scene(scene, case: CaseResult) -> mrml.ResultNodes:
    """Load one finished cohort case (input volume + results) into ``scene``."""
    from msdseg.core.io import read_image

    image = read_image(case.input)
    volume = mrml.add_volume_from_sitk(scene, image, case.stem)
    labels = mrml.read_image(case.outputs["labels"])
    uncertainty = mrml.read_image(case.outputs["uncertainty"]) if "uncertainty" in case.outputs else None
    return mrml.import_results(scene, volume, labels, uncertainty)


def describe_result(result: JobResult) -> str:
    """One line for logs and message boxes."""
    if result.status == "done":
        if result.cases:
            done = sum(c.status == "done" for c in result.cases)
            return f"{done}/{len(result.cases)} cases segmented in {result.elapsed:.0f} s"
        return f"segmented in {result.elapsed:.0f} s"
    if result.status == "cancelled":
        return "cancelled"
    return f"failed: {result.error}"


__all__ = [
    "CaseResult",
    "CohortJob",
    "JobResult",
    "SegmentationJob",
    "WorkerConfig",
    "cohort_progress",
    "describe_result",
    "load_case_into_scene",
    "read_failures",
]
