"""MultiscaleDiffSeg: segment a T1 brain MRI into 32 FreeSurfer aseg structures (left/right hierarchy).

The module file of Slicer's scripted-module layout: the module class, the parameter node, the
widget and the self-test.  Everything the module does lives in the Qt-free ``MultiscaleDiffSegLib``
package (the logic, the worker process, the MRML results, the hemisphere eye icons), which CI
tests against real MRML from ``slicer-core``; this file needs the Slicer application.
"""
from __future__ import annotations  # Slicer 5.8's Python 3.9 must reach the version message

import logging
from pathlib import Path
from typing import Annotated

import ctk  # noqa: F401 - needed by the .ui custom widgets
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import MultiscaleDiffSegLib
from MultiscaleDiffSegLib import mrml, selftest, terminology, visibility
from MultiscaleDiffSegLib.jobs import JobResult, SegmentationJob, describe_result
from MultiscaleDiffSegLib.logic import Host, MultiscaleDiffSegLogic, use_host
from MultiscaleDiffSegLib.settings import (
    Device,
    Preset,
    SegmentSettings,
    estimate_text,
    resolve_device,
    settings_from_widgets,
)

MODULE_DIR = Path(__file__).resolve().parent

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
        use_host(applicationHost())  # MultiscaleDiffSeg.MultiscaleDiffSegLogic() in the console can ask and install
        slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted() -> None:
    """Watch Slicer's scene from the start, so that the hemisphere folders' eye icons work in a
    scene loaded before the module is opened; offer the sample T1 in the Sample Data module; load
    the terminology context the segments name."""
    visibility.watch_scene(slicer.mrmlScene)
    registerSampleData()
    loadTerminology()


def loadTerminology() -> None:
    """Segments name the module's own terminology context; Slicer's terminology selector must know it."""
    try:
        terminology.load_module_terminology(slicer.modules.terminologies.logic())
    except (OSError, ValueError, RuntimeError) as exc:
        logging.error(f"MultiscaleDiffSeg: {exc}")


def applicationHost() -> Host:
    """What the Qt-free logic needs from the application: dialogs, installers, environment, timer."""

    def ask(text: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, _("MultiscaleDiffSeg: install Python packages"))

    def installTorch(requirement: str) -> bool:
        import PyTorchUtils

        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=requirement)
        return torch is not None

    def makeTimer(intervalMs: int, callback) -> qt.QTimer:
        timer = qt.QTimer()
        timer.setInterval(intervalMs)
        timer.connect("timeout()", callback)
        return timer

    return Host(
        ask=ask,
        testing=lambda: slicer.app.testingEnabled(),
        pip_install=slicer.util.pip_install,
        install_torch=installTorch,
        temp_folder=lambda: slicer.app.temporaryPath,
        startup_environment=slicer.util.startupEnvironment,
        process_events=slicer.app.processEvents,
        make_timer=makeTimer,
    )


#
# Sample data
#


def registerSampleData() -> None:
    """Offer the shipped sample T1 in the Sample Data module (a local file, checked by SHA256)."""
    path = selftest.sample_t1_path()
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
        checksums=f"SHA256:{selftest.SAMPLE_T1_SHA256}",
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

        self.logic = MultiscaleDiffSegLogic(host=applicationHost())
        self.logic.logCallback = self.appendLog
        visibility.watch_scene(slicer.mrmlScene)  # again after a developer reload (cleanup stopped it)

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
        """Developer reload: also reload the Lib package (Slicer reloads only this file by itself).

        The old logic and scene watcher are stopped first: reloading replaces the Lib's module
        state, and observers or timers of the old code would otherwise keep running."""
        import importlib
        import sys

        self.cleanup()
        for name in MultiscaleDiffSegLib.RELOAD_ORDER:
            module = sys.modules.get(f"MultiscaleDiffSegLib.{name}")
            if module is not None:
                importlib.reload(module)
        importlib.reload(MultiscaleDiffSegLib)
        super().onReload()

    def cleanup(self) -> None:
        """Module widget going away (application exit, reload): stop the worker, the device probe
        and the poll timer, and every observer of this widget and of the scene watcher."""
        if self.logic:
            self.logic.shutdown()
        visibility.unwatch_scene(slicer.mrmlScene)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
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
        """A loaded scene may contain earlier results (its eye icons are connected by the watcher)."""
        self._updateResultsPanel()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(MultiscaleDiffSegParameterNode(self.logic.getParameterNode()))
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
# MultiscaleDiffSegTest
#


class MultiscaleDiffSegTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Developer mode > Reload and Test, or ctest); the steps are in
    MultiscaleDiffSegLib.selftest, where CI runs them too."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ResultsToMRML()
        self.setUp()
        self.test_SampleFastPreset()

    def test_ResultsToMRML(self) -> None:
        """Synthetic oblique volume and aseg labels -> segmentation, groups, table (no PyTorch needed)."""
        selftest.results_to_mrml(self, slicer.mrmlScene, self.delayDisplay)

    def test_SampleFastPreset(self) -> None:
        """The shipped sample T1, fast preset, real worker (skipped when PyTorch is missing)."""
        logic = MultiscaleDiffSegLogic(host=applicationHost())
        selftest.sample_fast_preset(self, slicer.mrmlScene, logic, self.delayDisplay)


__all__ = [
    "MultiscaleDiffSeg",
    "MultiscaleDiffSegLogic",
    "MultiscaleDiffSegParameterNode",
    "MultiscaleDiffSegTest",
    "MultiscaleDiffSegWidget",
    "registerSampleData",
]
