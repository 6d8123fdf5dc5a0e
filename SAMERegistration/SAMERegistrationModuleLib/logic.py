"""The scene-facing logic of the SAME Registration module, usable without Qt.

The registration itself runs in a child Python process (``python -m SAMERegistrationLib``), fed
with the volumes written to a temporary folder; its output files are loaded back into the nodes
chosen as outputs (sceneio). The widget polls a running job from a timer; scripts and tests call
``register(..., waitForCompletion=True)``. Every check of the inputs happens before the scene is
touched, so a refused request leaves the scene as it was; while a job runs the scene is watched,
and a run whose nodes leave the scene (or whose scene is closed) is cancelled.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import inspection, sceneio
from .dependencies import torchInstalled
from .job import JobInputs, JobState, LogHandler, ProgressHandler, RegistrationJob
from .settings import ROLE_ATTRIBUTE, InvalidInput, RegistrationOutputs, RegistrationSettings

OUTPUT_CLASSES = {
    "transform": ("vtkMRMLLinearTransformNode",),
    "volume": ("vtkMRMLScalarVolumeNode",),
    "labels": ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"),
    "fixedPoints": ("vtkMRMLMarkupsFiducialNode",),
    "movingPoints": ("vtkMRMLMarkupsFiducialNode",),
    "inverseTransform": ("vtkMRMLTransformNode",),
}


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
        self._matchSearch: inspection.MatchSearch | None = None
        self._observed = None  # (scene, observer tags)

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
        outputInverseTransform=None,
        waitForCompletion: bool = False,
        onProgress: ProgressHandler | None = None,
        onLog: LogHandler | None = None,
        onFinished: Callable[[RegistrationJob], None] | None = None,
        **settings,
    ) -> RegistrationJob:
        """Register ``moving`` to ``fixed`` (scalar volume nodes) in a child process.

        Keyword settings are the fields of RegistrationSettings (stages, features, device,
        spacing, threshold, coarseIterations, instanceIterations, weights, deformWeights, seed,
        keepPlacement).
        Outputs: the transform node is created when not given; other outputs are made only for
        the nodes given. ``outputInverseTransform`` (a vtkMRMLTransformNode) gets the inverse
        map, for fixed-space data to be shown in moving space. With ``waitForCompletion`` the call returns the completed job or raises
        RegistrationFailed (SAMERegistrationLib.errors); otherwise call ``job.poll()`` until it
        returns True. Raises InvalidInput, with the scene unchanged, when the request cannot run.
        If an input or output node leaves the scene during the run, or the scene is closed, the
        run is cancelled and the scene is left as it was.
        """
        try:
            options = RegistrationSettings(**settings)
        except TypeError as error:
            raise InvalidInput(f"Unknown setting: {error}.") from error
        outputs = RegistrationOutputs(
            outputTransform, outputVolume, outputLabels, outputFixedPoints, outputMovingPoints,
            outputInverseTransform,
        )  # fmt: skip
        self.checkInputs(fixed, moving, movingLabels, outputs, options)
        if not torchInstalled():
            raise InvalidInput(
                "PyTorch is not installed in Slicer's Python. Install the PyTorch extension, then "
                "press Apply in the SAME Registration module, which offers to install PyTorch."
            )
        command = self._command()
        inputs = JobInputs(fixed, moving, movingLabels)
        folder = Path(tempfile.mkdtemp(prefix="SAMERegistration-"))
        try:
            args = sceneio.writeInputs(self.scene, inputs, folder)
            from .process import BackgroundProcess

            process = BackgroundProcess(
                [*command, *args, "-o", str(folder / "output"), "--progress", "json"]
                + ["--save-feature-maps"]
                + options.arguments(),
                env=self._environment(options.device),
            )
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = RegistrationJob(
            inputs, outputs, options, folder, process,
            load=lambda job: sceneio.loadOutputs(self.scene, job),
            keepFiles=self.keepTemporaryFiles,
            onProgress=onProgress, onLog=onLog, onFinished=onFinished,
        )  # fmt: skip
        job.whenFinished(self._jobFinished)
        self.job = job
        self._watchScene()
        job.addLog("Running: " + " ".join(process.args))
        if waitForCompletion:
            try:
                job.wait()
            except KeyboardInterrupt:
                job.cancel()
                raise
        return job

    def _jobFinished(self, job: RegistrationJob) -> None:
        if self.job is job:
            self.job = None
        if job.state is JobState.COMPLETED:
            self.lastRun = job
            self._matchSearch = None

    # ---- watching the scene -------------------------------------------------------------------

    def _watchScene(self) -> None:
        """Observe node removal and scene close on the current scene (once)."""
        scene = self.scene
        if self._observed is not None and self._observed[0] is scene:
            return
        self.stopWatching()
        tags = [
            scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved),
            scene.AddObserver(scene.StartCloseEvent, self._onSceneClose),
        ]
        self._observed = (scene, tags)

    def stopWatching(self) -> None:
        if self._observed is not None:
            scene, tags = self._observed
            for tag in tags:
                scene.RemoveObserver(tag)
            self._observed = None

    def _onNodeRemoved(self, caller, event) -> None:
        job = self.job
        if job is None or job.finished or self.scene.IsClosing():
            return
        gone = sceneio.missingNodes(self.scene, job.inputs.nodes() + job.outputs.chosen())
        if gone:
            job.cancel(
                f"{', '.join(gone)} was deleted during the registration, which was stopped; "
                "nothing was added to the scene."
            )

    def _onSceneClose(self, caller, event) -> None:
        if self.job is not None:
            self.job.cancel("The scene was closed during the registration, which was stopped.")
        self.lastRun = None
        self._matchSearch = None

    # ---- checks -------------------------------------------------------------------------------

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
        _checkMovingTransform(moving, outputs.transform)
        if labels is not None:
            _checkLabels(labels, moving)
        settings.check()
        inputs = [node for node in (fixed, moving, labels) if node is not None]
        chosen = []
        for name, classes in OUTPUT_CLASSES.items():
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

    # ---- inspection ---------------------------------------------------------------------------

    def correspondence(self, fixedPoints, movingPoints, index: int):
        """World (RAS) positions of correspondence ``index`` (0-based) in the two point lists."""
        return inspection.correspondence(fixedPoints, movingPoints, index)

    def jumpSlices(self, fixedPosition, movingPosition, movingVolume) -> None:
        """Centre each slice view on the point of the volume it shows (see inspection)."""
        inspection.jumpSlices(self.scene, fixedPosition, movingPosition, movingVolume)

    def findMatch(self, movingPosition) -> tuple[np.ndarray, float]:
        """The fixed-volume match (RAS) of a point of the moving volume (its own RAS coordinates)
        and its similarity, from the features the last completed run wrote."""
        if self.lastRun is None:
            raise InvalidInput("Run a registration first: the match search uses its features.")
        if self._matchSearch is None:
            self._matchSearch = inspection.MatchSearch(self.lastRun)
        if not self._matchSearch.valid(self.scene):
            self.lastRun = self._matchSearch = None
            raise InvalidInput(
                "The fixed or moving volume changed (or was removed) since the registration. "
                "Run the registration again to search for matches."
            )
        return self._matchSearch.find(movingPosition)

    def computeQaVolume(self, transformNode, reference, output, kind: str = "magnitude") -> None:
        """Displacement magnitude or Jacobian volume on ``reference``'s grid (see inspection)."""
        inspection.computeQaVolume(transformNode, reference, output, kind)


def _checkMovingTransform(moving, outputTransform) -> None:
    """A transform the user put on the moving volume would be replaced: refuse it clearly."""
    parent = moving.GetParentTransformNode()
    if parent is None or parent is outputTransform or parent.GetAttribute(ROLE_ATTRIBUTE):
        return
    raise InvalidInput(
        f"The moving volume '{moving.GetName()}' is under the transform '{parent.GetName()}', "
        "which the registration would replace. To start from it, harden it (Data module: "
        "right-click the transform, Harden transform) and tick 'Start from the moving volume's "
        "placement' (Advanced); otherwise remove it, or choose it as the output transform to "
        "overwrite it."
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
