"""The segmentation job in a background thread, so the page stays live while the model runs.

Why a thread and not a process: :func:`msdseg.inference.pipeline.segment_image` already reports progress
and polls a cancel flag, PyTorch releases the GIL inside its kernels, and the network stays cached
between runs (a new process would reload it each time).  The thread never touches MRML or the
trame state: the app polls :meth:`SegmentationJob.status` from its event loop and imports the
result there, on the thread that owns the scene.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import SimpleITK as sitk

from msdseg.core.errors import Cancelled, InputError
from msdseg.core.settings import SegmentSettings
from msdseg.inference.pipeline import SegmentationResult, segment_image

Segmenter = Callable[..., SegmentationResult]

IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"


def time_left(fraction: float, seconds: float) -> str:
    """"about 40 s left": the time so far scaled by the work still to do (once there is a rate to go by)."""
    if fraction < 0.05 or seconds < 3:
        return "estimating the time left"
    left = seconds * (1.0 - fraction) / fraction
    return f"about {left:.0f} s left" if left < 90 else f"about {left / 60:.0f} min left"


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of the job, safe to hand to another thread."""

    state: str = IDLE
    progress: float = 0.0
    message: str = ""
    error: str = ""
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


class SegmentationJob:
    """Run ``segment_image`` once on a copy of the input; query with :meth:`status`."""

    def __init__(self, image: sitk.Image, settings: SegmentSettings, segmenter: Segmenter = segment_image):
        self._image = sitk.Image(image)  # the caller may load another volume meanwhile
        self._settings = settings
        self._segmenter = segmenter
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._status = JobStatus()
        self._result: SegmentationResult | None = None
        self._thread = threading.Thread(target=self._run, name="msdseg-segment", daemon=True)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._update(state=RUNNING, message="starting")
        self._thread.start()

    def cancel(self) -> None:
        """Ask the sampler to stop at its next check (within one denoising step)."""
        self._cancel.set()
        with self._lock:
            if self._status.state == RUNNING:
                self._status = replace(self._status, message="cancelling")

    def join(self, timeout: float | None = None) -> JobStatus:
        self._thread.join(timeout)
        return self.status()

    def status(self) -> JobStatus:
        with self._lock:
            return replace(self._status, seconds=round(time.monotonic() - self._started, 1) if self._started else 0.0)

    @property
    def result(self) -> SegmentationResult | None:
        """The result once :meth:`status` says ``done``."""
        return self._result

    def _update(self, **changes) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)

    def _progress(self, fraction: float, message: str) -> None:
        if not self._cancel.is_set():
            self._update(progress=float(min(max(fraction, 0.0), 1.0)), message=str(message))

    def _run(self) -> None:
        try:
            result = self._segmenter(self._image, self._settings, progress=self._progress, cancel=self._cancel.is_set)
        except Cancelled:
            self._update(state=CANCELLED, message="cancelled")
        except InputError as exc:
            self._update(state=FAILED, error=str(exc), message="failed")
        except Exception as exc:  # noqa: BLE001 - the page shows one line instead of a dead thread
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._update(state=FAILED, error=f"{type(exc).__name__}: {first}", message="failed")
        else:
            self._result = result
            self._update(state=DONE, progress=1.0, message="done")
