"""The module's logic: everything MultiscaleDiffSeg does, usable without its widget; Qt-free.

The Python console, scripts, the widget and the tests all use :class:`MultiscaleDiffSegLogic`.
What only the Slicer application can provide (dialogs, ``slicer.util.pip_install``, PyTorchUtils,
Slicer's startup environment, a Qt timer for polling) comes in through a :class:`Host` that the
module file builds; the default host is plain Python (slicer-core, CI, scripts): it installs
nothing and has no event loop, so only blocking runs are possible there.

Why not a subclass of ``slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic``: that module
imports ``qt`` and ``ctk`` and does not exist in slicer-core.  Slicer accepts any Python object as a
scripted module's logic; this class keeps that base class's parameter-node API (``moduleName``,
``getParameterNode``, ``createParameterNode``, ``getAllParameterNodes``) with the same behaviour.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import slicer

from . import dependencies, mrml, visibility
from .jobs import MODULE_DIR, CaseResult, CohortJob, JobResult, SegmentationJob, WorkerConfig
from .jobs import describe_result, load_case_into_scene
from .process import BackgroundProcess
from .settings import DEVICE_PROBE_CODE, Device, Preset, SegmentSettings
from .settings import python_executable, settings_from_widgets, worker_environment

#: Set to 1 to let the self-test (Slicer's testing mode) install PyTorch and the other packages.
SELFTEST_INSTALL_ENV = "MSDSEG_SELFTEST_INSTALL"


class Timer(Protocol):
    """The part of ``qt.QTimer`` the logic uses (the host creates it, already connected)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def isActive(self) -> bool: ...


@dataclass
class Host:
    """What the logic needs from the application around it.  The defaults are plain Python.

    :param ask: an OK/Cancel question (Slicer: ``slicer.util.confirmOkCancelDisplay``).
    :param testing: True in Slicer's testing mode (ctest on build machines, self-tests).
    :param pip_install: installs into the worker's Python; None: this Python installs nothing.
    :param install_torch: installs PyTorch with the PyTorch extension for a version requirement.
    :param temp_folder: where constraint files and the worker's input go.
    :param startup_environment: the environment the worker starts with (Slicer's startup one,
        so that the worker does not inherit the application's library paths).
    :param process_events: keeps the application responsive while a blocking run waits.
    :param make_timer: ``make_timer(interval_ms, callback)`` -> a stopped :class:`Timer`; None: no
        event loop, so ``blocking=False`` and the device probe are not available.
    """

    ask: Callable[[str], bool] | None = None
    testing: Callable[[], bool] = lambda: False
    pip_install: Callable[[list[str]], None] | None = None
    install_torch: Callable[[str], bool] | None = None
    temp_folder: Callable[[], str] | None = None
    startup_environment: Callable[[], Mapping[str, str]] | None = None
    process_events: Callable[[], None] = lambda: None
    make_timer: Callable[[int, Callable[[], None]], Timer] | None = None


_default_host = Host()


def use_host(host: Host) -> None:
    """Make ``host`` the default of logics created without one (the module does this in Slicer,
    so that ``MultiscaleDiffSeg.MultiscaleDiffSegLogic()`` in the console can ask and install)."""
    global _default_host
    _default_host = host


def install_allowed(text: str, testing: bool, ask: Callable[[str], bool] | None,
                    environ: Mapping[str, str] | None = None) -> bool:
    """Whether installing may go ahead.  Testing mode never installs unless allowed by
    :data:`SELFTEST_INSTALL_ENV` (build machines are offline and must not receive gigabytes);
    otherwise ``ask`` decides, and no ``ask`` means the caller already agreed."""
    if testing:
        return (environ if environ is not None else os.environ).get(SELFTEST_INSTALL_ENV) == "1"
    return True if ask is None else bool(ask(text))


class MultiscaleDiffSegLogic:
    """Console API (see docs/console_api.md): :meth:`segment`, :meth:`segmentFiles`,
    :meth:`set_group_visibility`, :meth:`show3D`, :meth:`cancel`."""

    POLL_INTERVAL_MS = 100

    def __init__(self, scene=None, host: Host | None = None) -> None:
        self.moduleName = "MultiscaleDiffSeg"
        self.isSingletonParameterNode = True
        self.host = host if host is not None else _default_host
        self._scene = scene
        self.logCallback: Callable[[str], None] | None = None
        self.keepTempFiles = False  # keep the worker's input/output folder (debugging)
        self.job: SegmentationJob | CohortJob | None = None
        self.deviceProbe: dict | None = None
        self.deviceProbeError = ""
        self._probeProcess: BackgroundProcess | None = None
        self._timer: Timer | None = None
        self._dependenciesOk = False

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # ------------------------------------------------------------------ parameter node
    def getParameterNode(self):
        """The module's ``vtkMRMLScriptedModuleNode`` (a singleton), created when missing.

        The widget wraps it in its ``@parameterNodeWrapper`` class, which needs the application."""
        if self.isSingletonParameterNode:
            node = self.scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                if node.GetAttribute("ModuleName") != self.moduleName:  # removed by a scene close
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
        else:
            found = self.getAllParameterNodes()
            if found:
                return found[0]
        return self.scene.AddNode(self.createParameterNode())

    def createParameterNode(self):
        node = self.scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # owned by the Python variable
        if self.isSingletonParameterNode:
            node.SetSingletonTag(self.moduleName)
        node.SetAttribute("ModuleName", self.moduleName)  # lets node selectors filter by module
        node.SetName(self.scene.GenerateUniqueName(self.moduleName))
        return node

    def getAllParameterNodes(self) -> list:
        nodes = []
        for index in range(self.scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
            node = self.scene.GetNthNodeByClass(index, "vtkMRMLScriptedModuleNode")
            if node.GetAttribute("ModuleName") == self.moduleName:
                nodes.append(node)
        return nodes

    # ------------------------------------------------------------------ dependencies
    def dependencyPlan(self) -> dependencies.InstallPlan:
        """What is missing (nothing is installed by asking)."""
        return dependencies.plan_installation(dependencies.probe_environment())

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install what the worker needs after asking once; raises with advice when that fails.

        Where the host cannot install (plain Python), a missing package is an error that says
        what to install."""
        if self._dependenciesOk:
            return
        host = self.host
        if host.pip_install is None:
            plan = self.dependencyPlan()
            if not plan.ok:
                raise RuntimeError(dependencies.failure_advice(plan, "missing: " + dependencies.missing_summary(plan)))
            self._dependenciesOk = True
            return
        ask = host.ask if askConfirmation else None
        dependencies.ensure(
            env_probe=dependencies.probe_environment,
            confirm=lambda text: install_allowed(text, host.testing(), ask),
            install_torch_extension=host.install_torch or _no_torch_extension,
            pip_install=host.pip_install,
            temp_folder=host.temp_folder() if host.temp_folder else tempfile.gettempdir(),
            log=self.log,
        )
        self._dependenciesOk = True
        self.deviceProbeError = ""

    # ------------------------------------------------------------------ worker
    def workerConfig(self) -> WorkerConfig:
        """The worker's Python, environment and temporary folder, as the host provides them."""
        host = self.host
        envBase = host.startup_environment() if host.startup_environment else None
        tempRoot = host.temp_folder() if host.temp_folder else None
        return WorkerConfig(python_executable(), MODULE_DIR, envBase, tempRoot, keep_temp=self.keepTempFiles)

    @property
    def isRunning(self) -> bool:
        return self.job is not None and self.job.running

    def cancel(self, wait: bool = False) -> None:
        """Stop the running job; its worker and all the worker's children are killed.

        Returns at once (the poll timer completes the stop) unless ``wait``, which returns only
        when the worker is gone (for application exit and reload, after which nothing polls)."""
        if self.job is not None:
            self.job.cancel(wait=wait)

    def shutdown(self) -> None:
        """Module widget going away (application exit, developer reload): stop the worker and the
        device probe, then the poll timer, so that no timer of an old logic keeps firing.  The
        stopped job is finished here (its temporary files removed), since nothing polls it later."""
        self.cancel(wait=True)
        deadline = time.monotonic() + 10.0
        while self.job is not None and self.job.poll() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopDeviceProbe()
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _run(self, job, blocking: bool):
        """Start a job and either wait for it (blocking) or poll it from the host's timer."""
        if self.isRunning:
            raise RuntimeError("a segmentation is already running: cancel it or wait for it to finish")
        if not blocking and self.host.make_timer is None:
            raise RuntimeError("blocking=False needs an event loop (the Slicer application); use blocking=True")
        self.job = job
        job.start()
        if blocking:
            while job.poll():
                self.host.process_events()  # keep the application responsive while waiting
                time.sleep(0.05)
            return job.result
        self._ensureTimer()
        return job

    def _ensureTimer(self) -> None:
        if self._timer is None:
            self._timer = self.host.make_timer(self.POLL_INTERVAL_MS, self.poll)  # type: ignore[misc]
        if not self._timer.isActive():
            self._timer.start()

    def poll(self) -> None:
        """One tick of the poll timer: deliver progress and results; stop the timer when idle."""
        busy = False
        if self.job is not None and self.job.running:
            busy = self.job.poll() or busy
        if self._probeProcess is not None and self._probeProcess.running:
            busy = self._probeProcess.poll() or busy
        if not busy and self._timer is not None:
            self._timer.stop()

    # ------------------------------------------------------------------ console API
    def segment(
        self,
        volumeNode,
        preset: str | Preset = "balanced",
        device: str | Device = "auto",
        steps: int | None = None,
        samples: int | None = None,
        uncertainty: bool = False,
        seed: int = 0,
        segmentationNode=None,
        callback: Callable[[float, str], None] | None = None,
        onDone: Callable[[JobResult], None] | None = None,
        blocking: bool = True,
        settings: SegmentSettings | None = None,
        model: str | None = None,
    ):
        """Segment ``volumeNode``; results go into the scene of the volume.

        :param preset: ``fast``, ``balanced`` (default) or ``accurate``.
        :param device: ``auto`` (CUDA > MPS > CPU), ``cpu``, ``cuda`` or ``mps``.
        :param steps, samples: override the preset (None = preset value; steps 0 = one pass).
        :param uncertainty: also create the uncertainty volume.
        :param segmentationNode: write into this node; None reuses this volume's previous result.
        :param callback: ``callback(fraction, message)`` for progress.
        :param onDone: ``onDone(JobResult)`` when finished (mainly for ``blocking=False``).
        :param blocking: True waits and returns :class:`mrml.ResultNodes` (raises ``RuntimeError``
            on failure or cancel); False returns the running job at once.
        :param settings: a :class:`msdseg.SegmentSettings` with any option of ``msdseg segment``
            (precision, spacing, mirroring, refinement, intensity refinement, ...); replaces the
            individual arguments above.
        """
        if volumeNode is None:
            raise ValueError("no input volume given")
        settings = (settings.validate() if settings is not None
                    else settings_from_widgets(preset, device, steps, samples, uncertainty, seed, model))
        self.ensureDependencies(askConfirmation=True)
        self.log(f"Segmenting '{volumeNode.GetName()}': preset {settings.preset}, device {settings.device}")
        job = SegmentationJob(volumeNode, settings, self.workerConfig(), segmentation_node=segmentationNode,
                              on_progress=callback, on_log=self.log, on_done=self._onDone(onDone))
        result = self._run(job, blocking)
        if not blocking:
            return result
        if not result.ok:
            raise RuntimeError(f"Segmentation of '{volumeNode.GetName()}' {describe_result(result)}")
        return result.nodes

    def segmentFiles(
        self,
        paths: Sequence[str | os.PathLike],
        outputDir: str | os.PathLike,
        preset: str | Preset = "balanced",
        device: str | Device = "auto",
        steps: int | None = None,
        samples: int | None = None,
        uncertainty: bool = False,
        seed: int = 0,
        overwrite: bool = False,
        loadResults: bool = False,
        callback: Callable[[float, str], None] | None = None,
        onDone: Callable[[JobResult], None] | None = None,
        blocking: bool = True,
        model: str | None = None,
        settings: SegmentSettings | None = None,
    ):
        """Segment image files into ``outputDir`` (cohorts): one worker for all files.

        Files, folders, glob patterns and .txt/.csv lists are accepted (as by ``msdseg segment``).
        Finished cases are skipped on a second run unless ``overwrite``; one failing file does not
        stop the others.  Blocking: returns a list of :class:`CaseResult` (``status`` done/failed,
        ``outputs`` kind -> path, ``reason``); with ``loadResults`` the finished cases are also
        loaded into the scene.  Non-blocking: returns the running job.  ``settings``: a
        :class:`msdseg.SegmentSettings` with any option of ``msdseg segment``, in place of the
        individual arguments.
        """
        settings = (settings.validate() if settings is not None
                    else settings_from_widgets(preset, device, steps, samples, uncertainty, seed, model))
        self.ensureDependencies(askConfirmation=True)
        job = CohortJob(paths, outputDir, settings, self.workerConfig(), overwrite=overwrite,
                        on_progress=callback, on_log=self.log, on_done=self._onDone(onDone))
        result = self._run(job, blocking)
        if not blocking:
            return result
        self.log(f"Cohort: {describe_result(result)}")
        if result.status == "cancelled":
            raise RuntimeError("Segmentation of the files was cancelled")
        if loadResults:
            for case in result.cases:
                if case.status == "done":
                    load_case_into_scene(self.scene, case)
        return result.cases

    def _onDone(self, userCallback: Callable[[JobResult], None] | None) -> Callable[[JobResult], None]:
        def done(result: JobResult) -> None:
            self.log(describe_result(result))
            if userCallback:
                userCallback(result)
        return done

    # ------------------------------------------------------------------ results
    def lastSegmentation(self):
        """The segmentation node of the most recent successful run (or None)."""
        if self.job is not None and self.job.result is not None and self.job.result.nodes is not None:
            return self.job.result.nodes.segmentation
        return None

    def set_group_visibility(self, group: str, visible: bool, segmentationNode=None) -> list[str]:
        """Show/hide a whole group in one action: 'left_hemisphere', 'right_hemisphere', 'midline'
        (or 'left'/'right', or any structure of the hierarchy such as 'left_subcortical')."""
        segmentationNode = segmentationNode or self.lastSegmentation()
        if segmentationNode is None:
            raise ValueError("no segmentation given and none segmented since Slicer started")
        return mrml.set_group_visibility(segmentationNode, group, visible)

    def show3D(self, segmentationNode=None) -> None:
        """Closed surfaces and 3D display for all segments (same as the 'Show 3D' button)."""
        segmentationNode = segmentationNode or self.lastSegmentation()
        if segmentationNode is None:
            raise ValueError("no segmentation given and none segmented since Slicer started")
        mrml.show_3d(segmentationNode)

    def attachVisibilitySync(self) -> int:
        """Connect the hemisphere folders' eye icons to their segments in this logic's scene.

        Slicer's own scene is watched from application start-up; this is for other scenes (scripts,
        slicer-core).  Returns the number of hemisphere folders found."""
        return visibility.watch_scene(self.scene).attach()

    # ------------------------------------------------------------------ device probe
    def startDeviceProbe(self, onResult: Callable[[dict | None], None] | None = None) -> None:
        """Ask the worker's Python which devices torch sees (asynchronously, once while Slicer runs)."""
        if self.host.make_timer is None or (self._probeProcess is not None and self._probeProcess.running):
            return
        plan = self.dependencyPlan()
        if plan.torch_action != "none":
            self.deviceProbeError = f"{plan.torch_reason}; PyTorch is installed on the first run"
            if onResult:
                onResult(None)
            return
        lines: list[str] = []
        self.deviceProbeError = ""

        def finished(outcome) -> None:
            import json

            for line in reversed(lines):
                try:
                    answer = json.loads(line)
                except ValueError:
                    continue
                if isinstance(answer, dict) and "cuda" in answer:
                    self.deviceProbe = answer
                    break
            if self.deviceProbe is None:
                self.deviceProbeError = f"PyTorch could not be started: {outcome.error or 'no answer'}; see the Log"
                self.log(f"Device probe failed: {outcome.error}\n" + "\n".join(outcome.stderr_tail))
            if onResult:
                onResult(self.deviceProbe)

        config = self.workerConfig()
        self._probeProcess = BackgroundProcess(
            [config.python, "-c", DEVICE_PROBE_CODE], env=worker_environment(MODULE_DIR, config.env_base),
            on_log=lines.append, on_finished=finished,
        ).start()
        self._ensureTimer()

    def stopDeviceProbe(self) -> None:
        if self._probeProcess is not None and self._probeProcess.running:
            self._probeProcess.cancel(wait=True)  # called on exit: nothing polls afterwards


def _no_torch_extension(requirement: str) -> bool:
    raise RuntimeError("the PyTorch extension is not available here; install torch with pip")


__all__ = ["CaseResult", "Host", "MultiscaleDiffSegLogic", "SELFTEST_INSTALL_ENV", "Timer", "install_allowed",
           "use_host"]
