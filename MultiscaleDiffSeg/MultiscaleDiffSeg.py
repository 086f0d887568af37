"""MultiscaleDiffSeg: segment a T1 brain MRI into 32 FreeSurfer aseg structures (left/right hierarchy).

Standard scripted-module layout (module, parameter node, widget, logic, test).  The widget is thin:
the logic runs the core (``msdseg``) in a worker process and turns its outputs into MRML nodes
through the Qt-free ``MultiscaleDiffSegLib`` package, which is what the CI tests exercise against
real MRML from ``slicer-core``.

The Qt imports are guarded so that the logic (console API) can also be imported where only
``slicer-core`` exists (CI, scripts); the widget needs the Slicer application.
"""
from __future__ import annotations  # Slicer 5.8's Python 3.9 must reach the version message

import logging
import os
import time
import unittest
from pathlib import Path
from typing import Annotated, Callable, Sequence

import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:  # the Slicer application
    import ctk  # noqa: F401 - needed by the .ui custom widgets
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_APPLICATION = True
except ImportError:  # slicer-core without Qt: only the logic and the test methods are usable
    qt = None
    HAVE_APPLICATION = False

    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

    def parameterNodeWrapper(cls):
        return cls

    class WithinRange:  # noqa: D101 - stand-in for the validator annotation
        def __init__(self, minimum, maximum) -> None:
            self.minimum, self.maximum = minimum, maximum

    class ScriptedLoadableModule:  # noqa: D101
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # noqa: D101
        def __init__(self, parent=None) -> None:
            raise RuntimeError("the MultiscaleDiffSeg widget needs the Slicer application")

    class ScriptedLoadableModuleLogic:  # noqa: D101
        def __init__(self, parent=None) -> None:
            pass

        def getParameterNode(self):
            raise RuntimeError("parameter nodes need the Slicer application")

    class ScriptedLoadableModuleTest(unittest.TestCase):  # noqa: D101
        def delayDisplay(self, message: str, msec: int = 0) -> None:
            logging.info(message)

    class VTKObservationMixin:  # noqa: D101
        def __init__(self) -> None:
            pass


from MultiscaleDiffSegLib import dependencies, mrml
from MultiscaleDiffSegLib.jobs import (
    CaseResult,
    CohortJob,
    JobResult,
    SegmentationJob,
    WorkerConfig,
    describe_result,
    load_case_into_scene,
)
from MultiscaleDiffSegLib.process import BackgroundProcess
from MultiscaleDiffSegLib.settings import (
    DEVICE_PROBE_CODE,
    Device,
    Preset,
    SegmentSettings,
    settings_from_widgets,
    estimate_text,
    python_executable,
    resolve_device,
    worker_environment,
)

MODULE_DIR = Path(__file__).resolve().parent
#: Set to 1 to let the self-test install PyTorch and the other packages (it never does otherwise).
SELFTEST_INSTALL_ENV = "MSDSEG_SELFTEST_INSTALL"

#: The small sample T1 the core ships for the self-test and the Sample Data module (MNI152 2009
#: template at 2 mm, see msdseg/resources/samples/README.md).  Regenerating the file means updating
#: the hash: the self-test and CI refuse a file whose SHA256 differs.
SAMPLE_DIR = MODULE_DIR / "msdseg" / "resources" / "samples"
SAMPLE_T1_FILE = "sample_T1.nii.gz"
SAMPLE_T1_SHA256 = "8ec9a926efd42db7a795e1044d7cd9c378a4517c4e9c20880ac304804a3b0c2e"


#
# MultiscaleDiffSeg
#


class MultiscaleDiffSeg(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help, acknowledgement)."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Multiscale Diffusion Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MultiscaleDiffSeg contributors"]
        self.parent.helpText = _("""
Segments a T1-weighted brain MRI into 32 FreeSurfer aseg structures organised as a left/right
hierarchy (hemispheres, cerebrum, cerebellum, deep grey matter, ventricles, midline), with a
multiscale diffusion model. Optional voxel-wise uncertainty and a table of structure volumes.
See the <a href="https://github.com/MultiscaleDiffSeg/SlicerMultiscaleDiffSeg/blob/main/docs/slicer_extension.md">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
Structures and label numbers follow FreeSurfer's aseg. Built on PyTorch, MONAI, SimpleITK and 3D Slicer.
""")
        if HAVE_APPLICATION:
            slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def sampleT1Path() -> Path | None:
    """The shipped sample T1, or None while it is not part of the package."""
    path = SAMPLE_DIR / SAMPLE_T1_FILE
    return path if path.is_file() else None


def sha256(path: Path) -> str:
    from msdseg.core.hashing import sha256_file

    return sha256_file(path)


def registerSampleData() -> None:
    """Offer the shipped sample T1 in the Sample Data module (a local file, checked by SHA256)."""
    path = sampleT1Path()
    if path is None:
        return
    import SampleData

    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.4
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("MultiscaleDiffSeg", title=_("MultiscaleDiffSeg"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="MultiscaleDiffSeg",
        sampleName="MultiscaleDiffSegT1",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "MultiscaleDiffSeg.png"),
        uris=path.as_uri(),
        fileNames=path.name,
        checksums=f"SHA256:{SAMPLE_T1_SHA256}" if SAMPLE_T1_SHA256 else None,
        nodeNames="MultiscaleDiffSegT1",
    )


#
# MultiscaleDiffSegParameterNode
#


@parameterNodeWrapper
class MultiscaleDiffSegParameterNode:
    """GUI state saved with the scene; names match the SlicerParameterName properties of the .ui.

    steps -1 and samples 0 mean "the preset's value" (the spin boxes show "preset default").
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    preset: Preset = Preset.balanced
    device: Device = Device.auto
    steps: Annotated[int, WithinRange(-1, 100)] = -1
    samples: Annotated[int, WithinRange(0, 64)] = 0
    uncertainty: bool = False
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0


#
# MultiscaleDiffSegWidget
#


class MultiscaleDiffSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node and shows the logic's progress and results."""

    GROUP_CHECKBOXES = {
        "leftHemisphereCheckBox": "left_hemisphere",
        "rightHemisphereCheckBox": "right_hemisphere",
        "midlineCheckBox": "midline",
    }

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: MultiscaleDiffSegLogic | None = None
        self._parameterNode: MultiscaleDiffSegParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._job: SegmentationJob | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MultiscaleDiffSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MultiscaleDiffSegLogic()
        self.logic.logCallback = self.appendLog

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        for name, group in self.GROUP_CHECKBOXES.items():
            getattr(self.ui, name).connect("toggled(bool)", lambda visible, g=group: self.onGroupToggled(g, visible))
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.onShowUncertainty)
        self.ui.showVolumesButton.connect("clicked(bool)", self.onShowVolumes)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)

        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.hide()
        self.initializeParameterNode()
        self._updateResultsPanel()

    def onReload(self) -> None:
        """Developer reload: also reload the Lib package (Slicer reloads only this file by itself)."""
        import importlib

        import MultiscaleDiffSegLib

        if self.logic:
            self.logic.cancel(wait=True)
        mrml.detach_group_visibility_sync()
        for name in ("settings", "process", "dependencies", "mrml", "jobs"):
            importlib.reload(importlib.import_module(f"MultiscaleDiffSegLib.{name}"))
        importlib.reload(MultiscaleDiffSegLib)
        super().onReload()

    def cleanup(self) -> None:
        """Module widget destroyed (application exit): stop a running worker, drop observers."""
        if self.logic:
            self.logic.cancel(wait=True)
            self.logic.stopDeviceProbe()
        mrml.detach_group_visibility_sync()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.logic.attachVisibilitySync()
        self._startDeviceProbe()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic and self.logic.isRunning:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene may contain earlier results: reconnect their hemisphere folders."""
        self.logic.attachVisibilitySync()
        self._updateResultsPanel()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and firstVolumeNode.GetAttribute(mrml.ROLE_ATTRIBUTE) is None:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: MultiscaleDiffSegParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        self._updateEstimate()

    def _checkCanApply(self) -> None:
        running = self.logic is not None and self.logic.isRunning
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running segmentation (the worker process and its children).")
            self.ui.applyButton.enabled = True
        elif self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.text = _("Segment")
            self.ui.applyButton.toolTip = _("Segment the input volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Segment")
            self.ui.applyButton.toolTip = _("Select a T1 volume.")
            self.ui.applyButton.enabled = False

    def _settings(self) -> SegmentSettings:
        p = self._parameterNode
        return settings_from_widgets(p.preset, p.device, p.steps, p.samples, p.uncertainty, p.seed)

    # ------------------------------------------------------------------ device and estimate
    def _startDeviceProbe(self) -> None:
        if self.logic.deviceProbe is None:
            self.logic.startDeviceProbe(lambda probe: self._updateEstimate())
        self._updateEstimate()

    def _updateEstimate(self) -> None:
        if not self._parameterNode:
            return
        try:
            settings = self._settings()
        except ValueError as exc:
            self.ui.estimateLabel.text = str(exc)
            return
        if self.logic.deviceProbeError:
            self.ui.estimateLabel.text = _("Device: unknown ({reason}).").format(reason=self.logic.deviceProbeError)
            return
        choice = resolve_device(settings.device, self.logic.deviceProbe)
        volume = self._parameterNode.inputVolume
        voxels = None
        if volume is not None and volume.GetImageData() is not None:
            dims = volume.GetImageData().GetDimensions()
            voxels = dims[0] * dims[1] * dims[2]
        self.ui.estimateLabel.text = estimate_text(settings, choice, voxels)

    # ------------------------------------------------------------------ running
    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.onCancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            self.logic.ensureDependencies(askConfirmation=True)
            self._startDeviceProbe()
            p = self._parameterNode
            output = p.outputSegmentation
            if mrml.is_result_of_other_input(output, p.inputVolume):
                output = None  # keep the other volume's result; reuse or create this volume's own
            self.ui.logTextEdit.clear()
            self._job = self.logic.segment(
                p.inputVolume, settings=self._settings(), segmentationNode=output,
                callback=self.onProgress, onDone=self.onDone, blocking=False,
            )
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Starting the worker...")
            self._checkCanApply()

    def onCancel(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to cancel the segmentation.")):
            self.ui.statusLabel.text = _("Cancelling...")
            self.logic.cancel()  # returns at once: the GUI stays responsive while the worker stops

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(1000 * fraction))
        self.ui.progressBar.format = f"{100 * fraction:.0f} %"
        self.ui.statusLabel.text = message

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onDone(self, result: JobResult) -> None:
        self._job = None
        self._checkCanApply()
        self.ui.progressBar.hide()
        self.ui.statusLabel.text = describe_result(result).capitalize()
        if result.status == "done" and result.nodes is not None:
            if self._parameterNode:  # None when the scene was closed meanwhile
                self._parameterNode.outputSegmentation = result.nodes.segmentation
            slicer.util.setSliceViewerLayers(background=result.nodes.segmentation.GetNodeReference(
                mrml.INPUT_REFERENCE_ROLE), fit=False)
            self.ui.showUncertaintyCheckBox.checked = False
            self._updateResultsPanel()
        elif result.status == "failed":
            slicer.util.errorDisplay(
                _("Segmentation failed: {error}").format(error=result.error),
                detailedText="\n".join(result.outcome.stderr_tail) if result.outcome else None,
            )

    # ------------------------------------------------------------------ results
    def onOutputChanged(self, node) -> None:
        self.ui.show3DButton.setSegmentationNode(node)
        self._updateResultsPanel()

    def _currentResult(self):
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        if node is not None and node.GetAttribute(mrml.ROLE_ATTRIBUTE) == mrml.ROLE_SEGMENTATION:
            return node
        return None

    def _updateResultsPanel(self) -> None:
        segmentation = self._currentResult()
        self.ui.resultsCollapsibleButton.enabled = segmentation is not None
        if segmentation is None:
            return
        self.ui.show3DButton.setSegmentationNode(segmentation)
        for name, group in self.GROUP_CHECKBOXES.items():
            box = getattr(self.ui, name)
            wasBlocked = box.blockSignals(True)
            box.checked = mrml.group_visibility(segmentation, group)
            box.blockSignals(wasBlocked)
        hasUncertainty = segmentation.GetNodeReference(mrml.UNCERTAINTY_REFERENCE_ROLE) is not None
        self.ui.showUncertaintyCheckBox.enabled = hasUncertainty

    def onGroupToggled(self, group: str, visible: bool) -> None:
        segmentation = self._currentResult()
        if segmentation is not None:
            with slicer.util.tryWithErrorDisplay(_("Failed to change the visibility."), waitCursor=False):
                self.logic.set_group_visibility(group, visible, segmentation)

    def onShowUncertainty(self, show: bool) -> None:
        segmentation = self._currentResult()
        node = segmentation.GetNodeReference(mrml.UNCERTAINTY_REFERENCE_ROLE) if segmentation else None
        if show and node is None:
            slicer.util.messageBox(_("No uncertainty map: tick 'Uncertainty map' and segment again."))
            return
        slicer.util.setSliceViewerLayers(foreground=node if show else None, foregroundOpacity=0.6, fit=False)

    def onShowVolumes(self) -> None:
        segmentation = self._currentResult()
        table = segmentation.GetNodeReference(mrml.VOLUMES_REFERENCE_ROLE) if segmentation else None
        if table is None:
            slicer.util.messageBox(_("Segment a volume first: the table is created with the segmentation."))
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


#
# MultiscaleDiffSegLogic
#


class MultiscaleDiffSegLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable without the widget (Python console, scripts, tests).

    Console API (see docs/console_api.md): :meth:`segment`, :meth:`segmentFiles`,
    :meth:`set_group_visibility`, :meth:`show3D`, :meth:`cancel`.
    """

    POLL_INTERVAL_MS = 100

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.logCallback: Callable[[str], None] | None = None
        self.keepTempFiles = False  # keep the worker's input/output folder (debugging)
        self.job: SegmentationJob | CohortJob | None = None
        self.deviceProbe: dict | None = None
        self.deviceProbeError = ""
        self._probeProcess: BackgroundProcess | None = None
        self._timer = None
        self._dependenciesOk = False

    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self) -> MultiscaleDiffSegParameterNode:
        return MultiscaleDiffSegParameterNode(super().getParameterNode())

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # ------------------------------------------------------------------ dependencies
    def dependencyPlan(self) -> dependencies.InstallPlan:
        """What is missing (nothing is installed by asking)."""
        return dependencies.plan_installation(dependencies.probe_environment())

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install what the worker needs after asking once; raises with advice when that fails."""
        if self._dependenciesOk:
            return
        if not HAVE_APPLICATION:
            plan = self.dependencyPlan()
            if not plan.ok:
                raise RuntimeError(dependencies.failure_advice(plan, "missing: " + dependencies.missing_summary(plan)))
            self._dependenciesOk = True
            return

        def confirm(text: str) -> bool:
            if slicer.app.testingEnabled():  # a test run never installs GBs by itself (build machines)
                return os.environ.get(SELFTEST_INSTALL_ENV) == "1"
            if not askConfirmation:
                return True
            return slicer.util.confirmOkCancelDisplay(text, _("MultiscaleDiffSeg: install Python packages"))

        def installTorch(requirement: str) -> bool:
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=requirement)
            return torch is not None

        dependencies.ensure(
            env_probe=dependencies.probe_environment,
            confirm=confirm,
            install_torch_extension=installTorch,
            pip_install=slicer.util.pip_install,
            temp_folder=slicer.app.temporaryPath,
            log=self.log,
        )
        self._dependenciesOk = True
        self.deviceProbeError = ""

    # ------------------------------------------------------------------ worker
    def workerConfig(self) -> WorkerConfig:
        """PythonSlicer with Slicer's startup environment (as slicer.util.launchConsoleProcess does)."""
        envBase = slicer.util.startupEnvironment() if HAVE_APPLICATION else None
        tempRoot = slicer.app.temporaryPath if HAVE_APPLICATION else None
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

    def _run(self, job, blocking: bool):
        """Start a job and either wait for it (blocking) or poll it from a Qt timer."""
        if self.isRunning:
            raise RuntimeError("a segmentation is already running: cancel it or wait for it to finish")
        if not blocking and qt is None:
            raise RuntimeError("blocking=False needs the Slicer application (a Qt event loop); use blocking=True")
        self.job = job
        job.start()
        if blocking:
            while job.poll():
                if HAVE_APPLICATION:
                    slicer.app.processEvents()  # keep Slicer responsive while waiting
                time.sleep(0.05)
            return job.result
        self._ensureTimer()
        return job

    def _ensureTimer(self) -> None:
        if self._timer is None:
            self._timer = qt.QTimer()
            self._timer.setInterval(self.POLL_INTERVAL_MS)
            self._timer.connect("timeout()", self._poll)
        if not self._timer.isActive():
            self._timer.start()

    def _poll(self) -> None:
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
        """Reconnect hemisphere folders to their segments (after loading a saved scene)."""
        return mrml.attach_group_visibility_sync(self.scene)

    # ------------------------------------------------------------------ device probe
    def startDeviceProbe(self, onResult: Callable[[dict | None], None] | None = None) -> None:
        """Ask the worker's Python which devices torch sees (asynchronously, once while Slicer runs)."""
        if qt is None or (self._probeProcess is not None and self._probeProcess.running):
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


#
# MultiscaleDiffSegTest
#


class MultiscaleDiffSegTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Developer mode > Reload and Test, or ctest)."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ResultsToMRML()
        self.setUp()
        self.test_SampleFastPreset()

    def test_ResultsToMRML(self) -> None:
        """Synthetic oblique volume and aseg labels -> segmentation, groups, table (no PyTorch needed)."""
        import numpy as np
        import SimpleITK as sitk
        from msdseg.core.labels import load_tree

        self.delayDisplay("Importing synthetic labels")
        tree = load_tree()
        image = sitk.Image([24, 20, 12], sitk.sitkInt16)
        image.SetSpacing([1.2, 0.9, 2.5])
        c, s = np.cos(0.4), np.sin(0.4)
        image.SetDirection([c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
        image.SetOrigin([10.0, -20.0, 5.0])
        volume = mrml.add_volume_from_sitk(slicer.mrmlScene, image, "SyntheticT1")
        labels_array = np.zeros((12, 20, 24), dtype=np.uint16)
        labels_array[2:6, 3:9, 4:12] = 17  # left hippocampus
        labels_array[2:6, 3:9, 12:20] = 53  # right hippocampus
        labels_array[7:10, 5:15, 8:16] = 16  # brainstem
        labels = sitk.GetImageFromArray(labels_array)
        labels.CopyInformation(image)
        nodes = mrml.import_results(slicer.mrmlScene, volume, labels)
        segmentation = nodes.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(tree.leaves))
        self.assertEqual(segmentation.GetSegment("left_hippocampus").GetName(), "Left hippocampus")
        self.assertEqual(set(nodes.group_items), {"left_hemisphere", "right_hemisphere", "midline"})
        voxel_ml = 1.2 * 0.9 * 2.5 / 1000.0
        self.assertAlmostEqual(mrml.table_volumes(nodes.table)["left_hippocampus"], 4 * 6 * 8 * voxel_ml, places=9)
        MultiscaleDiffSegLogic().set_group_visibility("left_hemisphere", False, nodes.segmentation)
        display = nodes.segmentation.GetDisplayNode()
        self.assertFalse(display.GetSegmentVisibility("left_hippocampus"))
        self.assertTrue(display.GetSegmentVisibility("right_hippocampus"))
        again = mrml.import_results(slicer.mrmlScene, volume, labels)
        self.assertIs(again.segmentation, nodes.segmentation)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 1)
        self.delayDisplay("Synthetic import passed")

    def test_SampleFastPreset(self) -> None:
        """The shipped sample T1, fast preset, real worker: 32 named segments and a volume table."""
        path = sampleT1Path()
        if path is None:
            self.delayDisplay(f"Sample T1 {SAMPLE_DIR / SAMPLE_T1_FILE} is not shipped yet: sample test skipped")
            return
        if SAMPLE_T1_SHA256:
            self.assertEqual(sha256(path), SAMPLE_T1_SHA256, "sample T1 file is corrupted (SHA256 mismatch)")
        if HAVE_APPLICATION:
            volume = slicer.util.loadVolume(str(path))
        else:  # slicer-core: no IO plugins of the application
            import SimpleITK as sitk

            volume = mrml.add_volume_from_sitk(slicer.mrmlScene, sitk.ReadImage(str(path)), "sample_T1")
        logic = MultiscaleDiffSegLogic()
        plan = logic.dependencyPlan()
        if not plan.ok and os.environ.get(SELFTEST_INSTALL_ENV) != "1":
            # Slicer's build machines run this test offline and must not receive PyTorch
            self.delayDisplay(f"Sample test skipped: {dependencies.missing_summary(plan)}; the self-test "
                              f"installs nothing unless {SELFTEST_INSTALL_ENV}=1")
            return
        self.delayDisplay("Segmenting the sample with the fast preset")
        nodes = logic.segment(volume, preset="fast", device="auto", blocking=True)
        segmentation = nodes.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 32)
        for segment_id in ("left_thalamus", "right_thalamus", "brainstem"):
            self.assertIsNotNone(segmentation.GetSegment(segment_id))
        volumes = mrml.table_volumes(nodes.table)
        self.assertGreater(volumes["brain"], 0.0)
        self.assertAlmostEqual(volumes["brain"], sum(volumes[c] for c in
                                                     ("left_hemisphere", "right_hemisphere", "midline")), places=6)
        logic.show3D(nodes.segmentation)
        self.delayDisplay("Sample test passed")


__all__ = [
    "CaseResult",
    "MultiscaleDiffSeg",
    "MultiscaleDiffSegLogic",
    "MultiscaleDiffSegParameterNode",
    "MultiscaleDiffSegTest",
    "MultiscaleDiffSegWidget",
    "registerSampleData",
    "sampleT1Path",
]
