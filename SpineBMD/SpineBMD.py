"""SpineBMD: opportunistic trabecular vBMD per vertebra from routine CT (3D Slicer module).

The module only translates between widgets, MRML nodes and ``spinekit`` calls. The measuring
and the MRML conversions live in Qt-free code (``SpineBMDLib.logic`` and ``spinekit.mrml``),
so every GUI action is one Logic call that also works from the Python console.
"""

import importlib.util
import logging
import os
import pathlib
import sys
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer import (
    vtkMRMLPlotChartNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

# A source checkout keeps the shared `spinekit` package next to this module's folder; the
# installed extension puts it beside the module, already on Slicer's Python path.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("spinekit") is None and os.path.isdir(os.path.join(_checkout, "spinekit")):
    sys.path.append(_checkout)

# Qt-free parts (importable without Slicer's GUI; see SpineBMDLib/__init__.py).
from spinekit.errors import InputError  # noqa: E402
from SpineBMDLib import dependencies  # noqa: E402
from SpineBMDLib.logic import CALIBRATION_MODES, PHASES, ROI_MODES, SpineBMDResults  # noqa: E402
from SpineBMDLib.logic import SpineBMDLogic as SpineBMDCoreLogic  # noqa: E402
from SpineBMDLib.worker import BackgroundRun  # noqa: E402


#
# SpineBMD
#
class SpineBMD(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Spine BMD")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["SpineKit contributors"]
        self.parent.helpText = _(
            "Trabecular volumetric bone mineral density (mg/cm3 hydroxyapatite) per vertebra from a "
            "routine CT, without a calibration phantom: vertebrae are labelled, the trabecular region "
            "of each body is measured and converted with an internal (phantomless) or asynchronous "
            "calibration, corrected for contrast phase, and the L1-L2 mean is classified with the "
            "ACR thresholds (>120 normal, 80-120 osteopenia, <80 osteoporosis). "
            "Research use only; not a medical device. "
            "See <a href=\"https://github.com/spinekit/SlicerSpineKit\">the project page</a>.")
        self.parent.acknowledgementText = _(
            "Uses NIST attenuation data through xraylib; test data from the TotalSegmentator project.")


#
# Parameter node
#
@parameterNodeWrapper
class SpineBMDParameterNode:
    """Inputs and outputs of one SpineBMD run (saved with the scene).

    inputVolume - CT volume in HU.
    inputSegmentation - optional existing vertebra segmentation (segments named by level).
    calibration - phantomless (internal) or asynchronous (scanner table).
    calibrationTable - asynchronous: a scanner table JSON (empty: the packaged table).
    contrastPhase - auto (detected) or the known phase.
    roiMode - whole trabecular body or QCT-style mid-vertebral ellipse.
    age, sex - for T/Z-scores and BMD age (0 / "" = unknown; prefilled from DICOM).
    outputSegmentation, outputTable, outputChart - result nodes (created when empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    calibration: Annotated[str, Choice(list(CALIBRATION_MODES))] = "phantomless"
    calibrationTable: pathlib.Path
    contrastPhase: Annotated[str, Choice(list(PHASES))] = "auto"
    roiMode: Annotated[str, Choice(list(ROI_MODES))] = "whole"
    age: Annotated[float, WithinRange(0, 120)] = 0.0
    sex: Annotated[str, Choice(["", "F", "M"])] = ""
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    outputChart: vtkMRMLPlotChartNode


#
# Widget
#
class SpineBMDWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: Optional[BackgroundRun] = None
        self._runContext = None
        self._results: Optional[SpineBMDResults] = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SpineBMD.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SpineBMDLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecomputeButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.progressBar.hide()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelRun()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SpineBMDParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry the parameter names in their SlicerParameterName property (.ui file).
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        """The one place that decides which buttons are usable."""
        p = self._parameterNode
        running = self._run is not None
        hasInput = bool(p and p.inputVolume)
        self.ui.applyButton.enabled = running or hasInput
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = (_("Stop the computation") if running else
                                       _("Measure vBMD per vertebra") if hasInput else
                                       _("Select a CT volume first"))
        canRecompute = bool(hasInput and (p.outputSegmentation or p.inputSegmentation))
        self.ui.recomputeButton.enabled = canRecompute and not running
        self.ui.recomputeButton.toolTip = (_("Measure again from the (edited) segmentation")
                                           if canRecompute else _("Run Apply or select a segmentation first"))
        self.ui.exportButton.enabled = self._results is not None and not running

    def onInputVolumeChanged(self, node) -> None:
        """Prefill age and sex from the DICOM header when the volume came from DICOM."""
        if node is None or self._parameterNode is None:
            return
        defaults = SpineBMDCoreLogic.defaultsFromDicom(node, getattr(slicer, "dicomDatabase", None))
        if defaults.get("age"):
            self._parameterNode.age = float(defaults["age"])
        if defaults.get("sex"):
            self._parameterNode.sex = defaults["sex"]

    # --- Apply / Cancel ---------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._run is not None:
            self._cancelRun()
            return
        self._start(recompute=False)

    def onRecomputeButton(self) -> None:
        self._start(recompute=True)

    def _start(self, recompute: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the computation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            segmentation = (p.outputSegmentation or p.inputSegmentation) if recompute else p.inputSegmentation
            dicom = SpineBMDCoreLogic.defaultsFromDicom(p.inputVolume, getattr(slicer, "dicomDatabase", None))
            options = self.logic.optionsFrom(p)
            if recompute:
                options["outputSegmentation"] = None  # measure the edited node, leave it as it is
            self._run, self._runContext = self.logic.start(
                p.inputVolume, segmentationNode=segmentation, metadata=dicom["metadata"], **options)
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            self.ui.statusLabel.text = _("Working...")
            self._timer.start()
            self._checkCanApply()

    def _cancelRun(self) -> None:
        if self._run is not None:
            self._run.cancel()
            if hasattr(self, "ui"):
                self.ui.statusLabel.text = _("Cancelling...")

    def _poll(self) -> None:
        if self._run is None:
            self._timer.stop()
            return
        state = self._run.state()
        self.ui.progressBar.value = int(100 * state.fraction)
        self.ui.progressBar.setFormat(f"%p% {state.message}")
        if not state.done:
            return
        self._timer.stop()
        self.ui.progressBar.hide()
        context = self._runContext
        self._run, self._runContext = None, None
        if state.cancelled:
            self.ui.statusLabel.text = _("Cancelled.")
        elif state.error is not None:
            self.ui.statusLabel.text = _("Failed.")
            logging.error(state.traceback)
            if isinstance(state.error, InputError):  # the user's input: one sentence is enough
                slicer.util.errorDisplay(str(state.error))
            else:
                slicer.util.errorDisplay(_("SpineBMD failed: {error}").format(error=state.error),
                                         detailedText=state.traceback)
        else:
            with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
                self._results = self.logic.finish(state.result, context, self._parameterNode)
                self.ui.statusLabel.text = self._results.summary_line
                self.ui.statusLabel.toolTip = "\n".join(self._results.warnings)  # details on hover
                self.logic.showInViews(self._results)
                for warning in self._results.warnings:
                    logging.warning(warning)
        self._checkCanApply()

    def onExportButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to export the report."), waitCursor=True):
            directory = qt.QFileDialog.getExistingDirectory(
                slicer.util.mainWindow(), _("Folder for the SpineBMD report"))
            if not directory:
                return
            files = self.logic.exportReport(self._results, directory)
            slicer.util.infoDisplay(_("Report written to {folder}").format(folder=directory),
                                    detailedText="\n".join(str(f) for f in files.values()))


#
# Logic
#
class SpineBMDLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: parameter node, dependencies, views. The measuring and the MRML
    conversions are in SpineBMDLib.logic.SpineBMDLogic (Qt-free), reachable as ``self.core``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = SpineBMDCoreLogic(slicer.mrmlScene)

    def getParameterNode(self):
        return SpineBMDParameterNode(super().getParameterNode())

    @staticmethod
    def ensureDependencies(requirements=None) -> bool:
        """Install missing Python packages after the user agrees (never at import)."""
        return dependencies.ensure(requirements or dependencies.CORE_REQUIREMENTS,
                                   confirm=slicer.util.confirmOkCancelDisplay,
                                   installer=dependencies.slicer_installer())

    @staticmethod
    def optionsFrom(p: SpineBMDParameterNode) -> dict:
        table = str(p.calibrationTable or "").strip()
        return {"calibration": p.calibration, "phase": p.contrastPhase, "roiMode": p.roiMode,
                "calibrationTable": table if table not in ("", ".") else None,
                "age": p.age or None, "sex": p.sex or None,
                "outputSegmentation": p.outputSegmentation, "outputTable": p.outputTable,
                "outputChart": p.outputChart}

    def process(self, inputVolume: vtkMRMLScalarVolumeNode,
                inputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
                calibration: str = "phantomless", phase: str = "auto", age: Optional[float] = None,
                sex: Optional[str] = None, roiMode: str = "whole",
                outputSegmentation: Optional[vtkMRMLSegmentationNode] = None,
                outputTable: Optional[vtkMRMLTableNode] = None,
                outputChart: Optional[vtkMRMLPlotChartNode] = None,
                waitForCompletion: bool = True):
        """Measure trabecular vBMD per vertebra and show segments, table, chart and summary.

        :param inputVolume: CT volume (HU).
        :param inputSegmentation: existing vertebra segmentation (segments named by level);
            None runs the builtin segmenter.
        :param calibration: "phantomless" or "asynchronous".
        :param phase: "auto", "native", "arterial" or "portal-venous".
        :param age: years (None: no T/Z-score or BMD age). :param sex: "F", "M" or None.
        :param roiMode: "whole" or "mid".
        :param outputSegmentation, outputTable, outputChart: nodes to reuse; None creates them.
        :param waitForCompletion: True blocks and returns SpineBMDResults; False returns the
            running BackgroundRun at once (poll ``run.state()``, then call ``finish``).
        """
        options = dict(calibration=calibration, phase=phase, age=age, sex=sex, roiMode=roiMode,
                       outputSegmentation=outputSegmentation, outputTable=outputTable,
                       outputChart=outputChart)
        if waitForCompletion:
            return self.core.process(inputVolume, segmentationNode=inputSegmentation, **options)
        run, _context = self.start(inputVolume, segmentationNode=inputSegmentation, **options)
        return run

    def start(self, inputVolume, segmentationNode=None, outputSegmentation=None, outputTable=None,
              outputChart=None, **options):
        """Gather inputs on the main thread and start the computation in a background thread."""
        inputs = self.core.gather(inputVolume, segmentationNode, **options)
        context = {"inputVolume": inputVolume, "inputs": inputs, "segmentationNode": segmentationNode,
                   "outputSegmentation": outputSegmentation, "outputTable": outputTable,
                   "outputChart": outputChart}
        run = BackgroundRun(lambda progress: SpineBMDCoreLogic.compute(inputs, progress)).start()
        return run, context

    def finish(self, bmd, context, parameterNode=None) -> SpineBMDResults:
        """Show a finished computation (main thread) and remember the nodes in the parameters."""
        keep = context["segmentationNode"] is not None and context["outputSegmentation"] is None
        results = self.core.show(
            bmd, context["inputVolume"], context["inputs"].image,
            segmentationNode=context["segmentationNode"] if keep else context["outputSegmentation"],
            tableNode=context["outputTable"], chartNode=context["outputChart"], keepSegmentation=keep)
        if parameterNode is not None:
            parameterNode.outputSegmentation = results.segmentationNode
            parameterNode.outputTable = results.tableNode
            parameterNode.outputChart = results.chartNode
        return results

    def recompute(self, inputVolume, segmentationNode, **options) -> SpineBMDResults:
        """Measure again after editing the segmentation in Segment Editor."""
        return self.core.recompute(inputVolume, segmentationNode, **options)

    def exportReport(self, results: SpineBMDResults, outputDirectory: str) -> dict:
        """levels.csv, summary.json, report.html and label maps into a folder."""
        return self.core.exportReport(results, outputDirectory)

    @staticmethod
    def showInViews(results: SpineBMDResults) -> None:
        """CT in the slice views, segments in 2D and 3D, table and chart in the layout."""
        segmentation = results.segmentationNode
        volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        if volume is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        results.segmentationNode.CreateClosedSurfaceRepresentation()
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(results.tableNode.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        slicer.modules.plots.logic().ShowChartInLayout(results.chartNode)


#
# Test (runs inside Slicer: Reload and Test)
#
class SpineBMDTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SpineBMD_phantom()

    def test_SpineBMD_phantom(self):
        """Phantom CT with known density per level -> segments, table and chart as expected."""
        import numpy as np

        from spinekit import mrml
        from spinekit.phantom import CTPhantomConfig, generate_ct_phantom

        self.delayDisplay("Starting the test")
        truth = {"T12": 150.0, "L1": 110.0, "L2": 70.0, "L3": 130.0}
        ph = generate_ct_phantom(CTPhantomConfig(first_level="T12", last_level="L3", spacing_mm=(1.5, 1.5, 1.5),
                                                 densities_mg_cm3=truth, noise_hu=10, seed=0))
        volume = mrml.volume_node_from_image(ph.image, slicer.mrmlScene, "phantom CT")
        labels = mrml.labels_to_segmentation_node(ph.vertebrae, volume, bodies=ph.bodies)
        logic = SpineBMDLogic()
        results = logic.process(volume, inputSegmentation=labels, phase="native", age=65, sex="F")
        names = [results.segmentationNode.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(results.segmentationNode.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(sorted(names), sorted(truth))
        for level, density in truth.items():
            self.assertAlmostEqual(results.level(level).vbmd_mg_cm3, density, delta=10)
        self.assertEqual(results.chartNode.GetNumberOfPlotSeriesNodes(), 3)
        self.assertTrue(np.isfinite(results.level("L1").body_volume_cm3))
        self.delayDisplay("Test passed")
