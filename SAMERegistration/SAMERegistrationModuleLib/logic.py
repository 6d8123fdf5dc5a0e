"""The scene-facing logic of the SAME Registration module, usable without Qt.

The registration itself runs in a child Python process (``python -m SAMERegistrationLib``), fed
with the volumes written to a temporary folder; its output files are loaded back into the nodes
chosen as outputs. The widget polls a running job from a timer; scripts and tests call
``register(..., waitForCompletion=True)``. Every check of the inputs happens before the scene is
touched, so a refused request leaves the scene as it was.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAGES = ("affine", "coarse", "deform", "instance")
FEATURES = ("auto", "sam", "mind")
QA_KINDS = ("magnitude", "jacobian")
# The progress steps the library reports, in order (SAMERegistrationLib.pipeline.STEPS).
STEPS = ("prepare", "features", "matching", "affine", "coarse", "deform", "instance", "finish")
DENSE_STAGES = ("coarse", "deform", "instance")
ROLE_ATTRIBUTE = "SAMERegistration.Role"  # set on nodes this module creates by itself
# Window of the find-match search with MIND around where the registration maps the point: MIND
# describes local structure only, so a wider search finds look-alikes elsewhere.
MIND_SEARCH_RADIUS_MM = 10.0
GPU_FAILURE_HINTS = ("cuda", "gpu", "cudnn", "nvidia")
LOG_LINES = 2000  # lines of child output kept in memory for the panel

ProgressHandler = Callable[[str, int, int, float], None]  # stage, done, total, overall 0..1
LogHandler = Callable[[str], None]


class InvalidInput(ValueError):
    """The chosen nodes or settings cannot be registered; the scene was not changed."""


class RegistrationFailed(RuntimeError):
    """The registration process failed. ``deviceFailure``: a GPU problem, the CPU may work."""

    def __init__(self, message: str, deviceFailure: bool = False) -> None:
        super().__init__(message)
        self.deviceFailure = deviceFailure


@dataclass
class RegistrationSettings:
    """What the command line is asked to do; None keeps the library's default."""

    stages: tuple[str, ...] = STAGES
    features: str = "auto"
    device: str = "auto"
    spacing: float | None = None  # working grid spacing, mm
    threshold: float | None = None  # similarity threshold of the matches
    coarseIterations: int | None = None
    instanceIterations: int | None = None
    weights: str | None = None  # SAM checkpoint
    deformWeights: str | None = None  # SAM-deform network weights
    seed: int | None = None

    def check(self) -> None:
        stages = tuple(self.stages)
        if not stages:
            raise InvalidInput("Choose at least one stage (affine, coarse, deform or instance).")
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise InvalidInput(f"Unknown stage(s) {', '.join(unknown)}; use {', '.join(STAGES)}.")
        if self.features not in FEATURES:
            raise InvalidInput(f"Features must be one of {', '.join(FEATURES)}.")
        if self.device not in ("auto", "cpu", "cuda") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise InvalidInput(f"Device must be auto, cpu or cuda:N, not '{self.device}'.")
        if self.spacing is not None and not 0.25 <= self.spacing <= 20:
            raise InvalidInput("The working spacing must lie between 0.25 and 20 mm.")
        if self.threshold is not None and not -1.0 <= self.threshold < 1.0:
            raise InvalidInput("The similarity threshold must lie in [-1, 1).")
        for name in ("coarseIterations", "instanceIterations", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidInput(f"{name} must not be negative.")
        for name, path in (("SAM weights", self.weights), ("deform weights", self.deformWeights)):
            if path and not Path(path).is_file():
                raise InvalidInput(f"The {name} file '{path}' does not exist. Choose the file.")

    def arguments(self) -> list[str]:
        """Command-line options for ``python -m SAMERegistrationLib``."""
        args = ["--stages", ",".join(self.stages), "--features", self.features]
        args += ["--device", self.device]
        for flag, value in (
            ("--spacing", self.spacing),
            ("--seed", self.seed),
            ("--weights", self.weights),
            ("--deform-weights", self.deformWeights),
        ):
            if value not in (None, ""):
                args += [flag, str(value)]
        for key, value in (
            ("matching.similarity_threshold", self.threshold),
            ("coarse.iterations", self.coarseIterations),
            ("instance.iterations", self.instanceIterations),
        ):
            if value is not None:
                args += ["--set", f"{key}={json.dumps(value)}"]
        return args


@dataclass
class RegistrationOutputs:
    """The nodes a run fills. ``transform`` is created when not given; None skips the others."""

    transform: object = None  # vtkMRMLLinearTransformNode: the affine, nested under the grid
    volume: object = None  # vtkMRMLScalarVolumeNode: moving resampled onto the fixed grid
    labels: object = None  # vtkMRMLSegmentationNode or vtkMRMLLabelMapVolumeNode, warped
    fixedPoints: object = None  # vtkMRMLMarkupsFiducialNode
    movingPoints: object = None  # vtkMRMLMarkupsFiducialNode
    qaVolume: object = None  # vtkMRMLScalarVolumeNode: displacement magnitude or Jacobian
    qaKind: str = "magnitude"
    gridTransform: object = None  # vtkMRMLGridTransformNode, set by the run when it has one


@dataclass
class _Inputs:
    fixed: object
    moving: object
    labels: object
    segments: dict[int, tuple[str, tuple]] = field(default_factory=dict)  # label -> name, colour


class RegistrationJob:
    """One run of the child process, from start to loaded outputs.

    ``state`` goes running -> completed, failed or cancelled. ``poll()`` advances it (call it
    from a timer); ``wait()`` blocks; ``cancel()`` stops the process and removes its files.
    """

    def __init__(
        self,
        logic: RegistrationLogic,
        inputs: _Inputs,
        outputs: RegistrationOutputs,
        settings: RegistrationSettings,
        folder: Path,
        process,
        onProgress: ProgressHandler | None,
        onLog: LogHandler | None,
        onFinished: Callable[[RegistrationJob], None] | None,
    ) -> None:
        self.logic = logic
        self.inputs = inputs
        self.outputs = outputs
        self.settings = settings
        self.folder = folder
        self.process = process
        self.state = "running"
        self.stage = ""
        self.progress = 0.0
        self.log: list[str] = []
        self.error: str | None = None
        self.deviceFailure = False
        self.report: dict | None = None
        self._reportPath: Path | None = None
        self._errorLines: list[str] = []
        self._onProgress = onProgress
        self._onLog = onLog
        self._onFinished = onFinished

    @property
    def finished(self) -> bool:
        return self.state != "running"

    def poll(self) -> bool:
        """Handle the output so far; when the process has ended, load the results. True when done."""
        if self.finished:
            return True
        code = self.process.poll(self._handleLine)
        if code is not None:
            self._conclude(code)
        return self.finished

    def wait(self) -> RegistrationJob:
        """Block until the run ends; raise RegistrationFailed unless it completed."""
        if not self.finished:
            self._conclude(self.process.wait(self._handleLine))
        if self.state == "failed":
            raise RegistrationFailed(self.error or "The registration failed.", self.deviceFailure)
        return self

    def cancel(self) -> None:
        """Stop the child process (and its children) and remove the temporary folder."""
        if self.finished:
            return
        self.process.stop()
        self.process.poll(self._handleLine)
        self._finish("cancelled")

    def _handleLine(self, stream: str, line: str) -> None:
        if stream == "stdout" and line.startswith("{"):
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                message = None
            if isinstance(message, dict) and "stage" in message:
                self._progress(message["stage"], int(message["done"]), int(message["total"]))
                return
            if isinstance(message, dict) and message.get("finished"):
                self._reportPath = Path(message["report"])
                return
        if stream == "stderr":
            self._errorLines.append(line)
        self._addLog(line)

    def _progress(self, stage: str, done: int, total: int) -> None:
        self.stage = stage
        index = STEPS.index(stage) if stage in STEPS else 0
        self.progress = (index + (done / total if total else 1.0)) / len(STEPS)
        if self._onProgress:
            self._onProgress(stage, done, total, self.progress)

    def _addLog(self, line: str) -> None:
        self.log.append(line)
        del self.log[:-LOG_LINES]
        if self._onLog:
            self._onLog(line)

    def _conclude(self, code: int) -> None:
        if self.finished:
            return
        if code == 0 and self._reportPath is not None:
            try:
                self.logic.loadOutputs(self)
            except Exception as error:
                self._addLog(traceback.format_exc())
                self.error = (
                    f"The registration finished, but its results could not be loaded: {error}"
                )
                self._finish("failed")
                return
            self._finish("completed")
            return
        # The library's own errors are one "error: ..." line; anything else ends in a traceback.
        errors = [line[len("error: ") :] for line in self._errorLines if line.startswith("error: ")]
        tail = "\n".join(self._errorLines[-15:]).strip()
        self.error = errors[-1] if errors else tail
        self.deviceFailure = self.settings.device != "cpu" and any(
            hint in self.error.lower() for hint in GPU_FAILURE_HINTS
        )
        if not self.error:
            self.error = f"The registration process exited with code {code}."
        if self.deviceFailure:
            self.error += "\nThe GPU failed; the registration can run on the CPU instead."
        self._finish("failed")

    def _finish(self, state: str) -> None:
        self.state = state
        if not self.logic.keepTemporaryFiles:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif state != "cancelled":
            self._addLog(f"Temporary files kept in {self.folder}")
        if self.logic.job is self:
            self.logic.job = None
        if self._onFinished:
            self._onFinished(self)


class RegistrationLogic:
    """Registers volume nodes with SAME++ and puts the results into the scene.

    ``scene`` defaults to ``slicer.mrmlScene``. Set ``keepTemporaryFiles`` to keep the child's
    input and output files (their folder is written to the job's log).
    """

    def __init__(self, scene=None) -> None:
        self._scene = scene
        self.keepTemporaryFiles = False
        self.job: RegistrationJob | None = None
        self.lastRun: RegistrationJob | None = None  # the last completed job
        self._featureCache: tuple[tuple, object, object] | None = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # ---- running ------------------------------------------------------------------------------

    def register(
        self,
        fixed,
        moving,
        movingLabels=None,
        *,
        outputTransform=None,
        outputVolume=None,
        outputLabels=None,
        outputFixedPoints=None,
        outputMovingPoints=None,
        outputQaVolume=None,
        qaKind: str = "magnitude",
        waitForCompletion: bool = False,
        onProgress: ProgressHandler | None = None,
        onLog: LogHandler | None = None,
        onFinished: Callable[[RegistrationJob], None] | None = None,
        **settings,
    ) -> RegistrationJob:
        """Register ``moving`` to ``fixed`` (scalar volume nodes) in a child process.

        Keyword settings are the fields of RegistrationSettings (stages, features, device,
        spacing, threshold, coarseIterations, instanceIterations, weights, deformWeights, seed).
        Outputs: the transform node is created when not given; other outputs are made only for
        the nodes given. With ``waitForCompletion`` the call returns the completed job or raises
        RegistrationFailed; otherwise call ``job.poll()`` until it returns True.
        Raises InvalidInput, with the scene unchanged, when the request cannot be run.
        """
        try:
            options = RegistrationSettings(**settings)
        except TypeError as error:
            raise InvalidInput(f"Unknown setting: {error}.") from error
        outputs = RegistrationOutputs(
            outputTransform,
            outputVolume,
            outputLabels,
            outputFixedPoints,
            outputMovingPoints,
            outputQaVolume,
            qaKind,
        )
        self.checkInputs(fixed, moving, movingLabels, outputs, options)
        _checkPyTorch()
        command = self._command()
        inputs = _Inputs(fixed, moving, movingLabels)
        folder = Path(tempfile.mkdtemp(prefix="SAMERegistration-"))
        try:
            args = self._writeInputs(inputs, folder)
            from .process import BackgroundProcess

            process = BackgroundProcess(
                [*command, *args, "-o", str(folder / "output"), "--progress", "json"]
                + options.arguments(),
                env=self._environment(options.device),
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = RegistrationJob(
            self, inputs, outputs, options, folder, process, onProgress, onLog, onFinished
        )
        self.job = job
        job._addLog("Running: " + " ".join(process.args))
        if waitForCompletion:
            try:
                job.wait()
            except KeyboardInterrupt:
                job.cancel()
                raise
        return job

    def checkInputs(
        self,
        fixed,
        moving,
        labels=None,
        outputs: RegistrationOutputs | None = None,
        settings: RegistrationSettings | None = None,
    ) -> None:
        """Raise InvalidInput saying what is wrong with a request, before anything is changed."""
        outputs = outputs or RegistrationOutputs()
        settings = settings or RegistrationSettings()
        if self.job is not None and not self.job.finished:
            raise InvalidInput("A registration is already running. Wait for it or cancel it.")
        _checkVolume(fixed, "fixed volume")
        _checkVolume(moving, "moving volume")
        if fixed is moving or fixed.GetID() == moving.GetID():
            raise InvalidInput(
                f"'{fixed.GetName()}' is chosen as both the fixed and the moving volume. Choose "
                "two different volumes."
            )
        if fixed.GetParentTransformNode() is not None:
            raise InvalidInput(
                f"The fixed volume '{fixed.GetName()}' is under the transform "
                f"'{fixed.GetParentTransformNode().GetName()}'. Results are in the fixed volume's "
                "own coordinates: remove or harden that transform (Data module) first."
            )
        if labels is not None:
            _checkLabels(labels, moving)
        settings.check()
        if outputs.qaKind not in QA_KINDS:
            raise InvalidInput(f"The QA volume kind must be one of {', '.join(QA_KINDS)}.")
        expected = {
            "transform": ("vtkMRMLLinearTransformNode",),
            "volume": ("vtkMRMLScalarVolumeNode",),
            "labels": ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"),
            "fixedPoints": ("vtkMRMLMarkupsFiducialNode",),
            "movingPoints": ("vtkMRMLMarkupsFiducialNode",),
            "qaVolume": ("vtkMRMLScalarVolumeNode",),
        }
        inputs = [node for node in (fixed, moving, labels) if node is not None]
        chosen = []
        for name, classes in expected.items():
            node = getattr(outputs, name)
            if node is None:
                continue
            if not any(node.IsA(cls) for cls in classes):
                raise InvalidInput(
                    f"The {name} output '{node.GetName()}' is a {node.GetClassName()}; it must "
                    f"be a {' or '.join(classes)}."
                )
            if any(node is other for other in inputs):
                raise InvalidInput(
                    f"'{node.GetName()}' is an input and cannot also be the {name} output. "
                    "Choose or create another node for the output."
                )
            if any(node is other for other in chosen):
                raise InvalidInput(
                    f"'{node.GetName()}' is chosen for two outputs. Choose a node for each."
                )
            chosen.append(node)
        if outputs.labels is not None and labels is None:
            raise InvalidInput(
                "A warped segmentation output is chosen without a moving segmentation or label "
                "map. Choose the moving segmentation, or clear the output."
            )

    def inputProblem(self, *args, **kwargs) -> str | None:
        """What checkInputs would refuse (for the Apply button's tooltip), or None."""
        try:
            self.checkInputs(*args, **kwargs)
        except InvalidInput as problem:
            return str(problem)
        return None

    def _command(self) -> list[str]:
        """The Python that runs the library: PythonSlicer inside Slicer, else this interpreter."""
        try:
            from slicer import app  # noqa: F401  (present only inside the Slicer application)
        except ImportError:
            return [sys.executable, "-m", "SAMERegistrationLib"]
        executable = shutil.which("PythonSlicer")
        if executable is None:
            raise InvalidInput("PythonSlicer was not found on the PATH; reinstall Slicer.")
        return [executable, "-m", "SAMERegistrationLib"]

    def _environment(self, device: str) -> dict[str, str]:
        spec = importlib.util.find_spec("SAMERegistrationLib")
        if spec is None or spec.origin is None:
            raise InvalidInput(
                "The SAMERegistrationLib package is missing beside the module. Reinstall the "
                "SAMERegistration extension."
            )
        libraryParent = str(Path(spec.origin).parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (libraryParent, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # cuda:N as numbered by nvidia-smi
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a broken GPU setup cannot disturb a CPU run
        return env

    def _writeInputs(self, inputs: _Inputs, folder: Path) -> list[str]:
        import slicer

        _writeVolume(inputs.fixed, folder / "fixed.nrrd")
        _writeVolume(inputs.moving, folder / "moving.nrrd")
        args = [str(folder / "fixed.nrrd"), str(folder / "moving.nrrd")]
        labels = inputs.labels
        if labels is None:
            return args
        path = folder / "moving_labels.nrrd"
        if labels.IsA("vtkMRMLLabelMapVolumeNode"):
            _writeVolume(labels, path)
        else:
            # Segments become labels 1..N in their order; the names and colours come back later.
            segmentation = labels.GetSegmentation()
            ids = [
                segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())
            ]
            for value, segmentId in enumerate(ids, start=1):
                segment = segmentation.GetSegment(segmentId)
                inputs.segments[value] = (segment.GetName(), tuple(segment.GetColor()))
            labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
            try:
                exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    labels,
                    ids,
                    labelmap,
                    inputs.moving,
                    slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                )
                if not exported:
                    raise InvalidInput(
                        f"The segmentation '{labels.GetName()}' could not be exported as labels "
                        "on the moving volume's grid."
                    )
                _writeVolume(labelmap, path)
            finally:
                self.scene.RemoveNode(labelmap)
        return [*args, "--moving-labels", str(path)]

    # ---- loading results ----------------------------------------------------------------------

    def loadOutputs(self, job: RegistrationJob) -> None:
        """Fill the job's output nodes from the files of its finished child process."""
        import SimpleITK as sitk

        from SAMERegistrationLib import mrml

        folder = job._reportPath.parent
        job.report = json.loads(job._reportPath.read_text())
        names = job.report["outputs"]
        fixed, moving = job.inputs.fixed, job.inputs.moving
        outputs = job.outputs
        scene = self.scene

        hasDense = any(
            job.report["stages"].get(stage, {}).get("status") == "done" for stage in DENSE_STAGES
        )
        affine, dense, grid = mrml.transform_parts_from_files(
            folder / names["affine"], folder / names["transform"] if hasDense else None
        )
        if outputs.transform is None:
            outputs.transform = scene.AddNewNodeByClass(
                "vtkMRMLLinearTransformNode", f"{moving.GetName()} to {fixed.GetName()} (SAME)"
            )
        linear = outputs.transform
        if dense is not None:
            outputs.gridTransform = self._gridNodeFor(linear)
        mrml.set_registration(linear, affine, outputs.gridTransform, dense, grid)
        for node in (linear, outputs.gridTransform):
            if node is not None:
                mrml.set_reference_volumes(node, fixed, moving)
        moving.SetAndObserveTransformNodeID(linear.GetID())

        if outputs.volume is not None:
            mrml.resample_to_reference(moving, fixed, outputs.volume)
            _copyVolumeDisplay(moving, outputs.volume)
        if outputs.labels is not None:
            warped = sitk.ReadImage(str(folder / names["warped_labels"]))
            self._loadLabels(warped, job.inputs, outputs.labels)
        if outputs.fixedPoints is not None or outputs.movingPoints is not None:
            fixedPoints, movingPoints, similarity = readMatches(folder / names["matches_csv"])
            if outputs.fixedPoints is not None:
                mrml.set_matches(outputs.fixedPoints, fixedPoints, similarity, "F", (0.2, 0.8, 0.2))
                outputs.fixedPoints.SetAndObserveTransformNodeID(None)
            if outputs.movingPoints is not None:
                mrml.set_matches(
                    outputs.movingPoints, movingPoints, similarity, "M", (0.2, 0.6, 1.0)
                )
                # Shown like the moving volume: under the transform, over the fixed anatomy.
                outputs.movingPoints.SetAndObserveTransformNodeID(linear.GetID())
        if outputs.qaVolume is not None:
            self.computeQaVolume(linear, fixed, outputs.qaVolume, outputs.qaKind)
        self.lastRun = job
        self._featureCache = None

    def _gridNodeFor(self, linear):
        """The grid node to fill: the one this module made for ``linear`` before, else a new one.

        A parent the user set up (not marked as ours) is never overwritten.
        """
        parent = linear.GetParentTransformNode()
        if (
            parent is not None
            and parent.IsA("vtkMRMLGridTransformNode")
            and parent.GetAttribute(ROLE_ATTRIBUTE) == "dense"
        ):
            return parent
        node = self.scene.AddNewNodeByClass(
            "vtkMRMLGridTransformNode", f"{linear.GetName()} (deformable)"
        )
        node.SetAttribute(ROLE_ATTRIBUTE, "dense")
        return node

    def _loadLabels(self, warped, inputs: _Inputs, output) -> None:
        import slicer

        from SAMERegistrationLib import mrml

        if output.IsA("vtkMRMLLabelMapVolumeNode"):
            mrml.update_volume_node_from_image(output, warped)
            output.SetAndObserveTransformNodeID(None)
            if output.GetDisplayNode() is None:
                output.CreateDefaultDisplayNodes()
            source = (
                inputs.labels.GetDisplayNode()
                if inputs.labels.IsA("vtkMRMLLabelMapVolumeNode")
                else None
            )
            if source is not None and source.GetColorNodeID():
                output.GetDisplayNode().SetAndObserveColorNodeID(source.GetColorNodeID())
            return
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            mrml.update_volume_node_from_image(labelmap, warped)
            with slicer.util.NodeModify(output):
                output.GetSegmentation().RemoveAllSegments()
                output.SetAndObserveTransformNodeID(None)
                output.SetReferenceImageGeometryParameterFromVolumeNode(inputs.fixed)
                slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                    labelmap, output
                )
                segmentation = output.GetSegmentation()
                for i in range(segmentation.GetNumberOfSegments()):
                    segment = segmentation.GetNthSegment(i)
                    if segment.GetLabelValue() in inputs.segments:
                        name, color = inputs.segments[segment.GetLabelValue()]
                        segment.SetName(name)
                        segment.SetColor(color)
            if output.GetDisplayNode() is None:
                output.CreateDefaultDisplayNodes()
        finally:
            self.scene.RemoveNode(labelmap)

    def computeQaVolume(self, transformNode, reference, output, kind: str = "magnitude") -> None:
        """Fill ``output`` with the displacement magnitude (mm) or Jacobian determinant of the
        map a volume under ``transformNode`` is resampled through, on ``reference``'s grid."""
        from SAMERegistrationLib import mrml

        if kind not in QA_KINDS:
            raise InvalidInput(f"The QA volume kind must be one of {', '.join(QA_KINDS)}.")
        image = mrml.displacement_qa_image(transformNode, reference, kind)
        mrml.update_volume_node_from_image(output, image)
        output.SetAndObserveTransformNodeID(None)
        if output.GetDisplayNode() is None:
            output.CreateDefaultDisplayNodes()

    # ---- inspection ---------------------------------------------------------------------------

    def correspondence(
        self, fixedPoints, movingPoints, index: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """World (RAS) positions of correspondence ``index`` (0-based) in the two point lists."""
        count = min(fixedPoints.GetNumberOfControlPoints(), movingPoints.GetNumberOfControlPoints())
        if not 0 <= index < count:
            raise InvalidInput(f"There is no correspondence {index + 1} (there are {count}).")
        return (
            np.array(fixedPoints.GetNthControlPointPositionWorld(index)),
            np.array(movingPoints.GetNthControlPointPositionWorld(index)),
        )

    def jumpSlices(self, fixedPosition, movingPosition, movingVolume) -> None:
        """Centre each slice view on the point of the volume it shows.

        Views showing ``movingVolume`` as background go to ``movingPosition``; the others to
        ``fixedPosition`` (world RAS).
        """
        scene = self.scene
        backgrounds = {}
        composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(composites.GetNumberOfItems()):
            composite = composites.GetItemAsObject(i)
            backgrounds[composite.GetLayoutName()] = composite.GetBackgroundVolumeID()
        slices = scene.GetNodesByClass("vtkMRMLSliceNode")
        movingId = movingVolume.GetID() if movingVolume is not None else None
        for i in range(slices.GetNumberOfItems()):
            sliceNode = slices.GetItemAsObject(i)
            showsMoving = (
                movingId is not None and backgrounds.get(sliceNode.GetLayoutName()) == movingId
            )
            position = movingPosition if showsMoving else fixedPosition
            sliceNode.JumpSliceByCentering(*map(float, position))

    def findMatch(self, movingPosition) -> tuple[np.ndarray, float]:
        """The fixed-volume match (RAS) of a point of the moving volume and its similarity.

        ``movingPosition`` is in the moving volume's own coordinates (RAS, before any transform).
        Uses the features of the last completed run's inputs and settings, computed once in this
        process and cached. SAM searches the whole fixed body; MIND, which is not unique across
        the body, searches within MIND_SEARCH_RADIUS_MM of where the registration maps the point.
        """
        from SAMERegistrationLib import mrml

        job = self.lastRun
        if job is None:
            raise InvalidInput("Run a registration first: the match search uses its features.")
        fixedMaps, movingMaps, features = self._features(job)
        movingLps = mrml.FLIP @ np.asarray(movingPosition, dtype=np.float64)
        expected = None
        if features == "mind":
            point = np.asarray(movingPosition, dtype=np.float64)[None]
            world = mrml.map_points_through(job.outputs.transform, point, to_world=True)[0]
            expected = mrml.FLIP @ world
        fixedLps, similarity = matchPoint(fixedMaps, movingMaps, movingLps, expected)
        return mrml.FLIP @ fixedLps, similarity

    def _features(self, job: RegistrationJob):
        from SAMERegistrationLib import mrml
        from SAMERegistrationLib.config import RegistrationConfig
        from SAMERegistrationLib.device import resolve_device
        from SAMERegistrationLib.features import make_extractor
        from SAMERegistrationLib.image import check_ct, to_working_grid

        fixed, moving = job.inputs.fixed, job.inputs.moving
        config = RegistrationConfig.from_dict(job.report["config"])
        key = (fixed.GetID(), fixed.GetImageData().GetMTime(), moving.GetID(),
               moving.GetImageData().GetMTime(), job.report["features"])  # fmt: skip
        if self._featureCache is None or self._featureCache[0] != key:
            config = config.with_overrides(
                {"features": job.report["features"], "device": job.settings.device}
            )
            extractor = make_extractor(config, resolve_device(config.device))
            maps = [
                extractor.extract(
                    to_working_grid(
                        check_ct(mrml.image_from_volume_node(node), node.GetName()),
                        config.working_spacing_mm,
                    )
                )
                for node in (fixed, moving)
            ]
            self._featureCache = (key, *maps)
        return self._featureCache[1], self._featureCache[2], job.report["features"]


def matchPoint(fixedMaps, movingMaps, movingLps, expectedLps=None, radius=MIND_SEARCH_RADIUS_MM):
    """Best fixed body voxel (LPS mm) for the descriptor at a moving point, and its similarity.

    The moving descriptor is taken at the nearest feature voxel, as the library's matching does;
    with ``expectedLps`` the search is limited to ``radius`` mm around it.
    """
    import torch

    index = np.rint(movingMaps.grid.physical_to_index(np.asarray(movingLps)[None])[0]).astype(int)
    size = np.array(movingMaps.grid.size_xyz)
    if np.any(index < 0) or np.any(index >= size):
        raise InvalidInput("The point lies outside the moving volume's body region. Pick another.")
    query = movingMaps.descriptor()[0, :, index[2], index[1], index[0]]
    zyx = np.argwhere(fixedMaps.body)
    positions = fixedMaps.grid.index_to_physical(zyx[:, ::-1].astype(np.float64))
    if expectedLps is not None:
        near = np.linalg.norm(positions - np.asarray(expectedLps), axis=1) <= radius
        if not near.any():
            raise InvalidInput(
                "No fixed body voxel lies near where the registration maps the point."
            )
        zyx, positions = zyx[near], positions[near]
    keys = fixedMaps.descriptor()[0][:, torch.as_tensor(zyx[:, 0]), torch.as_tensor(zyx[:, 1]),
                                     torch.as_tensor(zyx[:, 2])]  # fmt: skip
    similarity = (query.float() @ keys.float()).cpu().numpy()
    best = int(np.argmax(similarity))
    return positions[best], float(similarity[best])


def readMatches(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed points, moving points (N, 3, LPS mm) and similarities from the library's matches.csv."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fixed = np.array([[float(r[f"fixed_{a}_lps"]) for a in "xyz"] for r in rows]).reshape(-1, 3)
    moving = np.array([[float(r[f"moving_{a}_lps"]) for a in "xyz"] for r in rows]).reshape(-1, 3)
    similarity = np.array([float(r["similarity"]) for r in rows])
    return fixed, moving, similarity


def _checkPyTorch() -> None:
    if importlib.util.find_spec("torch") is None:
        raise InvalidInput(
            "PyTorch is not installed in Slicer's Python. Install the PyTorch extension, then "
            "press Apply in the SAME Registration module, which offers to install PyTorch."
        )


def _checkVolume(node, role: str) -> None:
    if node is None:
        raise InvalidInput(f"No {role} is chosen. Choose a scalar volume as the {role}.")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InvalidInput(
            f"The {role} '{node.GetName()}' is a {node.GetClassName()}; SAME registers scalar "
            "(grey-value) CT volumes. Choose a scalar volume."
        )
    image = node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InvalidInput(f"The {role} '{node.GetName()}' holds no image data. Load the volume.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InvalidInput(
            f"The {role} '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components "
            "per voxel; SAME needs a single-component (grey-value) CT volume."
        )
    dims = image.GetDimensions()
    if min(dims) < 2:
        raise InvalidInput(
            f"The {role} '{node.GetName()}' is a 2-D image ({'x'.join(map(str, dims))} voxels); "
            "SAME registers 3-D volumes. Choose a 3-D scan."
        )


def _checkLabels(labels, moving) -> None:
    if labels.IsA("vtkMRMLSegmentationNode"):
        if labels.GetSegmentation().GetNumberOfSegments() == 0:
            raise InvalidInput(
                f"The segmentation '{labels.GetName()}' has no segments. Choose one with segments."
            )
        return
    if not labels.IsA("vtkMRMLLabelMapVolumeNode") or labels.GetImageData() is None:
        raise InvalidInput(
            f"'{labels.GetName()}' is not a segmentation or a label map volume with image data."
        )
    if not _sameGrid(labels, moving):
        raise InvalidInput(
            f"The label map '{labels.GetName()}' does not lie on the grid of the moving volume "
            f"'{moving.GetName()}'. Convert it to a segmentation (Segmentations module), or "
            "resample it onto the moving volume with nearest-neighbour interpolation."
        )


def _sameGrid(a, b, tolerance: float = 1e-4) -> bool:
    import vtk

    matrices = []
    for node in (a, b):
        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        matrices.append(np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]))
    return a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions() and np.allclose(
        matrices[0], matrices[1], atol=tolerance
    )


def _writeVolume(node, path: Path) -> None:
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()  # faster; the file is temporary
    if not storage.WriteData(node):
        raise InvalidInput(f"'{node.GetName()}' could not be written to the temporary file {path}.")


def _copyVolumeDisplay(source, target) -> None:
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    display, original = target.GetDisplayNode(), source.GetDisplayNode()
    if original is not None and display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(original.GetWindow(), original.GetLevel())
        if original.GetColorNodeID():
            display.SetAndObserveColorNodeID(original.GetColorNodeID())
