"""SAME Registration: CT-to-CT registration with SAME++ (self-supervised anatomical embeddings).

The panel (Widget), the parameter node and the self-test live here and need the Slicer
application; the scene-facing logic is in SAMERegistrationModuleLib.logic and also runs headless.
"""

import enum
import importlib.util
import re
import sys
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
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

# Installed, the library sits beside this file; in a source checkout, beside this folder.
_sourceLibrary = Path(__file__).resolve().parent.parent
if (
    importlib.util.find_spec("SAMERegistrationLib") is None
    and (_sourceLibrary / "SAMERegistrationLib").is_dir()
):
    sys.path.append(str(_sourceLibrary))

from SAMERegistrationModuleLib.dependencies import ensureDependencies  # noqa: E402
from SAMERegistrationModuleLib.devices import describe_gpus, detect_gpus, device_choices  # noqa: E402
from SAMERegistrationModuleLib.inspection import FindMatchPlacement, qaCostText  # noqa: E402
from SAMERegistrationModuleLib.logic import RegistrationLogic  # noqa: E402
from SAMERegistrationModuleLib.scenario import runScenario  # noqa: E402
from SAMERegistrationModuleLib.settings import (  # noqa: E402
    ROLE_ATTRIBUTE,
    RegistrationOutputs,
    RegistrationSettings,
)

from SAMERegistrationLib.config import FEATURES, SPACING_RANGE_MM, STAGES  # noqa: E402

DOCUMENTATION_URL = "https://github.com/SAMERegistration/SlicerSAMERegistration#in-3d-slicer"

HELP_TEXT = """
Registers a moving CT to a fixed CT with SAME++: correspondences from self-supervised anatomical
embeddings (SAM, or MIND features without network weights), then affine, coarse and deformable
stages and instance optimisation. Needs Slicer 5.10 or later and the PyTorch extension.
<p>Documentation: <a href="{url}">{url}</a></p>
<p>Results: a linear transform (the affine part) under a grid transform (the deformable part,
stored in the resampling direction on the fixed grid). The moving volume is put under the linear
transform; put other moving-space data (segmentations, models, points) under it too. Optional: the
warped volume and segmentation on the fixed grid, the correspondences as two point lists (F-i in
the fixed volume, M-i in the moving volume; similarity in each description, green when it is at
least 0.9), and the inverse transform (moving to fixed, for fixed-space data). The run's report
(versions, device, configuration) is kept on the linear transform (attribute
SAMERegistration.Report) and saved with the scene. A displacement-magnitude or Jacobian
volume for quality control is computed on demand (Inspect).</p>
<p>The registration runs in a separate process; Apply turns into Cancel while it runs. Under
Inspect, click a correspondence to jump to it, or find the match of any point of the moving
volume.</p>
<p>Scripting: <code>SAMERegistrationLogic().register(fixed, moving, features="mind",
waitForCompletion=True)</code> returns the finished job, whose <code>outputs</code> hold the
nodes.</p>
"""

# The same wording as the README ("In 3D Slicer"); a test keeps the two equal.
CITATION = (
    'L. Tian et al., "SAME++: A Self-supervised Anatomical eMbeddings Enhanced medical image '
    'registration framework using stable sampling and regularized transformation"; K. Yan et al., '
    '"SAM: Self-supervised Learning of Pixel-wise Anatomical Embeddings in Radiological Images"'
)

ACKNOWLEDGEMENT_TEXT = (
    "This module implements SAME++ from its papers (public code: "
    "https://github.com/alibaba-damo-academy/same). Please cite when you use its results: "
    + CITATION
    + "."
)


class SAMERegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAME Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["SAMERegistration developers"]
        self.parent.helpText = _(HELP_TEXT).format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(ACKNOWLEDGEMENT_TEXT)


FEATURE_LABELS = {
    "auto": _("Auto (SAM when its weights are available, else MIND)"),
    "sam": _("SAM (anatomical embeddings)"),
    "mind": _("MIND (no network weights)"),
}

# The choices are the library's (SAMERegistrationLib.config.FEATURES), with a label each.
Features = enum.Enum("Features", [(name.upper(), name) for name in FEATURES])
Features.label = lambda self: FEATURE_LABELS.get(self.value, self.value)


class QaKind(enum.Enum):
    MAGNITUDE = "magnitude"
    JACOBIAN = "jacobian"

    def label(self):
        return {"magnitude": _("Displacement (mm)"), "jacobian": _("Jacobian")}[self.value]


@parameterNodeWrapper
class SAMERegistrationParameterNode:
    """The panel's state, saved with the scene. ``device`` is set from the device selector."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingLabels: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    affineStage: bool = True
    coarseStage: bool = True
    deformStage: bool = True
    instanceStage: bool = True
    features: Features = Features.AUTO
    device: str = "auto"
    workingSpacing: Annotated[float, WithinRange(*SPACING_RANGE_MM)] = 2.0
    similarityThreshold: Annotated[float, WithinRange(-1.0, 0.99)] = 0.7
    coarseIterations: Annotated[int, WithinRange(0, 10000)] = 100
    instanceIterations: Annotated[int, WithinRange(0, 10000)] = 50
    weightsFile: Path
    deformWeightsFile: Path
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    keepMovingPlacement: bool = False
    keepTemporaryFiles: bool = False
    outputTransform: vtkMRMLLinearTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    outputLabels: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]  # noqa: UP007
    fixedPoints: vtkMRMLMarkupsFiducialNode
    movingPoints: vtkMRMLMarkupsFiducialNode
    outputInverseTransform: vtkMRMLTransformNode
    qaVolume: vtkMRMLScalarVolumeNode
    qaKind: QaKind = QaKind.MAGNITUDE

    def settings(self, device: Optional[str] = None) -> RegistrationSettings:  # noqa: UP045
        return RegistrationSettings(
            stages=tuple(s for s in STAGES if getattr(self, f"{s}Stage")),
            features=self.features.value,
            device=device or self.device,
            spacing=self.workingSpacing,
            threshold=self.similarityThreshold,
            coarseIterations=self.coarseIterations,
            instanceIterations=self.instanceIterations,
            weights=_path(self.weightsFile),
            deformWeights=_path(self.deformWeightsFile),
            seed=self.seed,
            keepPlacement=self.keepMovingPlacement,
        )

    def outputs(self) -> RegistrationOutputs:
        return RegistrationOutputs(
            self.outputTransform,
            self.outputVolume,
            self.outputLabels,
            self.fixedPoints,
            self.movingPoints,
            self.outputInverseTransform,
        )


def _path(value) -> Optional[str]:  # noqa: UP045
    """A path parameter as a string; an empty path edit gives Path('.'), which means none."""
    text = str(value) if value is not None else ""
    return text if text not in ("", ".") else None


class SAMERegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = self._parameterNodeGuiTag = None  # the node and its GUI binding
        self._timer = None
        self._queryNode = None
        self._placement = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMERegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SAMERegistrationLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._pollJob)
        self._fillDevices()
        self.ui.correspondenceTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.correspondenceTable.connect("cellClicked(int,int)", self.onCorrespondenceClicked)
        self.ui.findMatchButton.connect("toggled(bool)", self.onFindMatchToggled)
        self.ui.computeQaButton.connect("clicked(bool)", self.onComputeQa)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.logic and self.logic.job is not None:
            self.logic.job.cancel()
        self.ui.findMatchButton.checked = False
        if self.logic:
            self.logic.stopWatching()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.ui.findMatchButton.checked = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameters
            )

    def onSceneStartClose(self, caller, event) -> None:
        # The logic cancels a running job and forgets the last run itself.
        self.ui.findMatchButton.checked = False
        self.ui.findMatchResultLabel.text = ""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameters
            )
        self._parameterNode = parameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameters)
            self._onParameters()

    # ---- panel state ----------------------------------------------------------------------------

    def _fillDevices(self) -> None:
        """Auto, each GPU nvidia-smi reports, CPU: found without importing PyTorch."""
        gpus = detect_gpus()
        combo = self.ui.deviceComboBox
        combo.blockSignals(True)
        combo.clear()
        for label, device in device_choices(gpus):
            combo.addItem(label, device)
        combo.blockSignals(False)
        self.ui.deviceInfoLabel.text = describe_gpus(gpus)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def _onParameters(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if parameters is None:
            return
        combo = self.ui.deviceComboBox
        index = combo.findData(parameters.device)
        if index < 0:  # e.g. a scene saved on a machine with another GPU
            index = combo.findData("auto")
        if combo.currentIndex != index:
            combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(False)
        self._fillCorrespondences()
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        button = self.ui.applyButton
        if self.logic.job is not None:
            button.text = _("Cancel")
            button.toolTip = _("Stop the registration; nothing is added to the scene.")
            button.enabled = True
            return
        button.text = _("Apply")
        parameters = self._parameterNode
        problem = (
            self.logic.inputProblem(
                parameters.fixedVolume,
                parameters.movingVolume,
                parameters.movingLabels,
                parameters.outputs(),
                parameters.settings(),
            )
            if parameters
            else _("The module has no parameter node.")
        )
        button.enabled = problem is None
        button.toolTip = problem or _("Register the moving volume to the fixed volume.")

    # ---- running ------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.logic.job is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self.logic.job.cancel()
            return
        if not ensureDependencies(self.resourcePath("requirements.txt"), self.moduleName):
            return
        self._start()

    def _start(self, device: Optional[str] = None) -> None:  # noqa: UP045
        parameters = self._parameterNode
        self.ui.logTextEdit.clear()
        self.ui.statusLabel.text = _("Starting...")
        self.ui.stageProgressBar.value = 0
        self.ui.overallProgressBar.value = 0
        self.logic.keepTemporaryFiles = parameters.keepTemporaryFiles
        with slicer.util.tryWithErrorDisplay(
            _("The registration could not start."), waitCursor=True
        ):
            outputs = parameters.outputs()
            self.logic.register(
                parameters.fixedVolume,
                parameters.movingVolume,
                parameters.movingLabels,
                outputTransform=outputs.transform,
                outputVolume=outputs.volume,
                outputLabels=outputs.labels,
                outputFixedPoints=outputs.fixedPoints,
                outputMovingPoints=outputs.movingPoints,
                outputInverseTransform=outputs.inverseTransform,
                onProgress=self._onProgress,
                onLog=self.ui.logTextEdit.appendPlainText,
                onFinished=self._onFinished,
                **vars(parameters.settings(device)),
            )
            self._timer.start()
        if self.logic.job is None:
            self.ui.statusLabel.text = ""
        self._updateApplyButton()

    def _pollJob(self) -> None:
        job = self.logic.job
        if job is None:
            self._timer.stop()
            return
        with slicer.util.tryWithErrorDisplay(_("Loading the registration results failed.")):
            job.poll()

    def _onProgress(self, stage: str, done: int, total: int, overall: float) -> None:
        self.ui.stageLabel.text = _("Stage: {stage}").format(stage=stage)
        self.ui.stageProgressBar.maximum = max(total, 1)
        self.ui.stageProgressBar.value = done
        self.ui.overallProgressBar.value = int(round(100 * overall))
        self.ui.statusLabel.text = _("Registering: {stage} ({done}/{total})").format(
            stage=stage, done=done, total=total
        )

    def _onFinished(self, job) -> None:
        self._timer.stop()
        self._updateApplyButton()
        parameters = self._parameterNode
        if job.state.value == "cancelled":
            self.ui.statusLabel.text = job.error or _("Cancelled: nothing was added to the scene.")
            return
        if job.state.value == "failed":
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error)
            if job.deviceFailure and slicer.util.confirmYesNoDisplay(
                _("{error}\n\nRun the registration on the CPU instead (slower)?").format(
                    error=job.error
                ),
                windowTitle=_("GPU failure"),
            ):
                parameters.device = "cpu"
                self._start("cpu")
                return
            slicer.util.errorDisplay(
                _("The registration failed:\n{error}").format(error=job.error),
                detailedText="\n".join(job.log[-200:]),
            )
            return
        self.ui.overallProgressBar.value = 100
        parameters.outputTransform = job.outputs.transform
        seconds = job.report.get("total_seconds", 0.0)
        self.ui.statusLabel.text = _(
            "Done in {seconds:.0f} s on {device} with {features} features; {matches} "
            "correspondences."
        ).format(
            seconds=seconds,
            device=job.report.get("device", "?"),
            features=job.report.get("features", "?"),
            matches=job.report.get("matches", {}).get("kept", "?"),
        )
        slicer.util.setSliceViewerLayers(
            background=job.inputs.fixed, foreground=job.inputs.moving, foregroundOpacity=0.5
        )
        self._fillCorrespondences(refill=True)

    # ---- inspection ---------------------------------------------------------------------------

    def _fillCorrespondences(self, refill: bool = False) -> None:
        """List the correspondences of the chosen point lists (again, after a run: ``refill``)."""
        table = self.ui.correspondenceTable
        parameters = self._parameterNode
        fixedPoints = parameters.fixedPoints if parameters else None
        movingPoints = parameters.movingPoints if parameters else None
        count = 0
        if fixedPoints and movingPoints:
            count = min(
                fixedPoints.GetNumberOfControlPoints(), movingPoints.GetNumberOfControlPoints()
            )
        if not refill and table.rowCount == count:
            return
        table.setSortingEnabled(False)
        table.setRowCount(count)
        for i in range(count):
            description = fixedPoints.GetNthControlPointDescription(i)
            match = re.search(r"[-0-9.]+$", description)
            similarity = qt.QTableWidgetItem()
            similarity.setData(qt.Qt.DisplayRole, float(match.group()) if match else 0.0)
            for column, item in enumerate(
                (
                    qt.QTableWidgetItem(fixedPoints.GetNthControlPointLabel(i)),
                    qt.QTableWidgetItem(movingPoints.GetNthControlPointLabel(i)),
                    similarity,
                )
            ):
                item.setData(qt.Qt.UserRole, i)
                table.setItem(i, column, item)
        table.setSortingEnabled(True)

    def onCorrespondenceClicked(self, row: int, column: int) -> None:
        parameters = self._parameterNode
        index = self.ui.correspondenceTable.item(row, 0).data(qt.Qt.UserRole)
        with slicer.util.tryWithErrorDisplay(_("Cannot show the correspondence.")):
            fixedPosition, movingPosition = self.logic.correspondence(
                parameters.fixedPoints, parameters.movingPoints, index
            )
            self.logic.jumpSlices(fixedPosition, movingPosition, parameters.movingVolume)

    def _ownPointList(self, name: str, role: str):
        """The point list this module keeps for ``role``, created on first use."""
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == role:
                return node
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        return node

    def onFindMatchToggled(self, checked: bool) -> None:
        if self._queryNode is not None:
            self.removeObserver(
                self._queryNode,
                slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                self.onQueryPlaced,
            )
            self._queryNode = None
        if self._placement is not None:
            self._placement.stop()
            self._placement = None
        if not checked:
            return
        moving = self._parameterNode.movingVolume
        if self.logic.lastRun is None or moving is None:
            self.ui.findMatchResultLabel.text = _("Run a registration first.")
            self.ui.findMatchButton.checked = False
            return
        query = self._ownPointList(_("SAME find-match queries"), "query")
        # Same coordinates as the moving volume, so a point placed on it is a moving-space point.
        query.SetAndObserveTransformNodeID(moving.GetTransformNodeID())
        self._queryNode = query
        self.addObserver(
            query, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onQueryPlaced
        )
        applicationLogic = slicer.app.applicationLogic()
        self._placement = FindMatchPlacement(
            applicationLogic.GetSelectionNode(),
            applicationLogic.GetInteractionNode(),
            onLeft=lambda: setattr(self.ui.findMatchButton, "checked", False),
        )
        self._placement.start(query)
        self.ui.findMatchResultLabel.text = _("Click a point of the moving volume in a slice view.")

    def onQueryPlaced(self, caller, event) -> None:
        index = caller.GetNumberOfControlPoints() - 1
        label = f"Q-{index + 1}"
        caller.SetNthControlPointLabel(index, label)
        self.ui.findMatchResultLabel.text = _("Searching...")
        with slicer.util.tryWithErrorDisplay(_("No match was found."), waitCursor=True):
            fixedPosition, similarity = self.logic.findMatch(
                caller.GetNthControlPointPosition(index)
            )
            found = self._ownPointList(_("SAME found matches"), "found")
            point = found.AddControlPoint(vtk.vtkVector3d(*fixedPosition), label)
            found.SetNthControlPointDescription(point, f"similarity {similarity:.3f}")
            self.ui.findMatchResultLabel.text = _(
                "{label}: match at ({x:.1f}, {y:.1f}, {z:.1f}) RAS, similarity {similarity:.2f}"
            ).format(label=label, x=fixedPosition[0], y=fixedPosition[1], z=fixedPosition[2],
                     similarity=similarity)  # fmt: skip
            self.logic.jumpSlices(
                fixedPosition,
                caller.GetNthControlPointPositionWorld(index),
                self._parameterNode.movingVolume,
            )

    def onComputeQa(self) -> None:
        parameters = self._parameterNode
        if not (parameters.outputTransform and parameters.fixedVolume and parameters.qaVolume):
            slicer.util.errorDisplay(
                _("Choose the fixed volume, the output transform and a QA volume (Outputs) first.")
            )
            return
        if not slicer.util.confirmOkCancelDisplay(
            _("Compute the {kind} volume on the fixed grid? {cost}").format(
                kind=parameters.qaKind.label(), cost=qaCostText(parameters.fixedVolume)
            ),
            windowTitle=_("Quality-control volume"),
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("Computing the QA volume failed."), waitCursor=True):
            self.logic.computeQaVolume(
                parameters.outputTransform,
                parameters.fixedVolume,
                parameters.qaVolume,
                parameters.qaKind.value,
            )
            slicer.util.setSliceViewerLayers(foreground=parameters.qaVolume, foregroundOpacity=0.5)


class SAMERegistrationLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """The module's logic: RegistrationLogic (usable headless) plus the module's parameter node.

    Scripting example::

        logic = SAMERegistrationLogic()
        job = logic.register(fixedNode, movingNode, features="mind", waitForCompletion=True)
        transformNode = job.outputs.transform
    """

    def __init__(self) -> None:
        # ScriptedLoadableModuleLogic calls super().__init__(), which is RegistrationLogic's.
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SAMERegistrationParameterNode(super().getParameterNode())


class SAMERegistrationTest(ScriptedLoadableModuleTest):
    """The panel, built and driven without PyTorch (so the Extensions Index's build machines test
    it), then a registration of a small synthetic pair where PyTorch is present; the same scenario
    runs in the headless pytest suite (Testing/test_slicer_module.py)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_panelWithoutPyTorch()
        self.setUp()
        self.test_registerSyntheticPair()

    def test_panelWithoutPyTorch(self):
        """Open the panel, choose volumes and check the Apply button's state and tooltip."""
        from SAMERegistrationModuleLib.scenario import makeSyntheticPair

        from SAMERegistrationLib import mrml

        self.delayDisplay("Opening the SAME Registration panel")
        slicer.util.selectModule("SAMERegistration")
        widget = slicer.util.getModuleWidget("SAMERegistration")
        parameters = widget._parameterNode
        self.assertIsNotNone(parameters)
        self.assertFalse(widget.ui.applyButton.enabled)
        self.assertIn("No fixed volume", widget.ui.applyButton.toolTip)

        pair = makeSyntheticPair()
        fixed = mrml.update_volume_node_from_image(
            slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed"), pair.fixed
        )
        moving = mrml.update_volume_node_from_image(
            slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving"), pair.moving
        )
        widget.ui.fixedVolumeSelector.setCurrentNode(fixed)
        widget.ui.movingVolumeSelector.setCurrentNode(moving)
        self.assertIs(parameters.fixedVolume, fixed)
        self.assertIs(parameters.movingVolume, moving)
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertEqual(widget.ui.applyButton.text, "Apply")

        widget.ui.movingVolumeSelector.setCurrentNode(fixed)  # the same volume twice
        self.assertFalse(widget.ui.applyButton.enabled)
        self.assertIn("both the fixed and the moving", widget.ui.applyButton.toolTip)
        self.delayDisplay("Panel test passed")

    def test_registerSyntheticPair(self):
        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed: the registration scenario is not run")
            return
        self.delayDisplay("Registering a synthetic CT pair (MIND features, CPU)")
        summary = runScenario(SAMERegistrationLogic(), slicer.mrmlScene)
        self.delayDisplay(
            "Test passed: mean error {error_before_mm:.1f} mm before, {error_after_mm:.1f} mm "
            "after; {matches} correspondences".format(**summary)
        )
