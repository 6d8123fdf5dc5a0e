"""Scene I/O of a run: the inputs written for the child process, its results read back.

Reading the results is split in two: everything that can fail (reading every file) happens first,
without touching the scene; then, once every node of the run is checked to be still in the scene,
the nodes are filled. So a run whose results cannot be read, or whose nodes were deleted, leaves
the scene exactly as it was.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .job import JobInputs, RegistrationJob
from .settings import REPORT_ATTRIBUTE, ROLE_ATTRIBUTE, InvalidInput

DENSE_STAGES = ("coarse", "deform", "instance")


def writeInputs(scene, inputs: JobInputs, folder: Path) -> list[str]:
    """Write the input volumes (and labels) for the child process; its positional arguments."""
    import slicer

    writeVolume(inputs.fixed, folder / "fixed.nrrd")
    writeVolume(inputs.moving, folder / "moving.nrrd")
    args = [str(folder / "fixed.nrrd"), str(folder / "moving.nrrd")]
    labels = inputs.labels
    if labels is None:
        return args
    path = folder / "moving_labels.nrrd"
    if labels.IsA("vtkMRMLLabelMapVolumeNode"):
        writeVolume(labels, path)
    else:
        # Segments become labels 1..N in their order; the names and colours come back later.
        segmentation = labels.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        for value, segmentId in enumerate(ids, start=1):
            segment = segmentation.GetSegment(segmentId)
            inputs.segments[value] = (segment.GetName(), tuple(segment.GetColor()))
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
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
            writeVolume(labelmap, path)
        finally:
            scene.RemoveNode(labelmap)
    return [*args, "--moving-labels", str(path)]


def writeVolume(node, path: Path) -> None:
    import slicer

    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()  # faster; the file is temporary
    if not storage.WriteData(node):
        raise InvalidInput(f"'{node.GetName()}' could not be written to the temporary file {path}.")


@dataclass
class RunFiles:
    """Everything read from a finished run's folder, before the scene is touched."""

    report: dict
    affine: np.ndarray  # 4x4 LPS, fixed -> moving
    deformable: object  # vtkOrientedGridTransform (RAS, FromParent) or None
    warped: object  # SimpleITK image or None
    warpedLabels: object  # SimpleITK image or None
    matches: tuple | None  # fixed (N, 3), moving (N, 3) LPS, similarity (N,)
    features: tuple | None  # (fixed, moving StoredFeatures, kind)


def readRunFiles(job: RegistrationJob) -> RunFiles:
    """Read what the job's outputs need from its folder; the scene is not touched."""
    import SimpleITK as sitk

    from SAMERegistrationLib import mrml
    from SAMERegistrationLib.feature_export import read_feature_maps

    folder = job.reportPath.parent
    report = json.loads(job.reportPath.read_text(encoding="utf-8"))
    names = report["outputs"]
    outputs = job.outputs
    hasDense = any(
        report["stages"].get(stage, {}).get("status") == "done" for stage in DENSE_STAGES
    )
    points = outputs.fixedPoints is not None or outputs.movingPoints is not None
    return RunFiles(
        report=report,
        affine=mrml.read_affine(folder / names["affine"]),
        deformable=mrml.read_deformable(folder / names["deformable"]) if hasDense else None,
        warped=sitk.ReadImage(str(folder / names["warped"])) if outputs.volume else None,
        warpedLabels=(
            sitk.ReadImage(str(folder / names["warped_labels"])) if outputs.labels else None
        ),
        matches=readMatches(folder / names["matches_csv"]) if points else None,
        features=(
            read_feature_maps(folder / names["feature_maps"]) if "feature_maps" in names else None
        ),
    )


def missingNodes(scene, nodes: list) -> list[str]:
    """Names of the nodes that are no longer in ``scene``."""
    return [node.GetName() or "?" for node in nodes if not scene.IsNodePresent(node)]


def loadOutputs(scene, job: RegistrationJob) -> None:
    """Fill the job's output nodes from the files of its finished child process."""
    from SAMERegistrationLib import mrml

    files = readRunFiles(job)
    gone = missingNodes(scene, job.inputs.nodes() + job.outputs.chosen())
    if gone:
        raise InvalidInput(
            f"{', '.join(gone)} left the scene during the run; nothing was changed. Run again."
        )
    job.report = files.report
    job.features = files.features
    fixed, moving = job.inputs.fixed, job.inputs.moving
    outputs = job.outputs
    if outputs.transform is None:
        outputs.transform = scene.AddNewNodeByClass(
            "vtkMRMLLinearTransformNode", f"{moving.GetName()} to {fixed.GetName()} (SAME)"
        )
        outputs.transform.SetAttribute(ROLE_ATTRIBUTE, "affine")
    linear = outputs.transform
    if files.deformable is not None:
        outputs.gridTransform = gridNodeFor(scene, linear)
    mrml.set_registration(linear, files.affine, outputs.gridTransform, files.deformable)
    for node in (linear, outputs.gridTransform):
        if node is not None:
            mrml.set_reference_volumes(node, fixed, moving)
    # The run's provenance (versions, device, configuration) is saved with the scene.
    linear.SetAttribute(REPORT_ATTRIBUTE, json.dumps(files.report))
    moving.SetAndObserveTransformNodeID(linear.GetID())

    if outputs.volume is not None:
        mrml.update_volume_node_from_image(outputs.volume, files.warped)
        outputs.volume.SetAndObserveTransformNodeID(None)
        copyVolumeDisplay(moving, outputs.volume)
    if outputs.labels is not None:
        loadLabels(scene, files.warpedLabels, job.inputs, outputs.labels)
    if files.matches is not None:
        fixedPoints, movingPoints, similarity = files.matches
        if outputs.fixedPoints is not None:
            mrml.set_matches(outputs.fixedPoints, fixedPoints, similarity, "F", (0.2, 0.8, 0.2))
            outputs.fixedPoints.SetAndObserveTransformNodeID(None)
        if outputs.movingPoints is not None:
            mrml.set_matches(outputs.movingPoints, movingPoints, similarity, "M", (0.2, 0.6, 1.0))
            # Shown like the moving volume: under the transform, over the fixed anatomy.
            outputs.movingPoints.SetAndObserveTransformNodeID(linear.GetID())
    extra = setInverse(scene, outputs.inverseTransform, files) if outputs.inverseTransform else []
    placed = [linear, outputs.gridTransform, *outputs.chosen(), *extra]
    placeInStudy(scene, fixed, [node for node in placed if node is not None])


def setInverse(scene, node, files: RunFiles) -> list:
    """Fill ``node`` with the inverse map ``q -> G^-1 (A^-1 q)``: the inverse affine alone, or the
    deformable part inverted (stored ToParent; Slicer inverts it where it is used) under a linear
    node holding the inverse affine, made or reused here. Returns the nodes made or reused."""
    import slicer

    from SAMERegistrationLib import mrml

    inverseAffine = np.linalg.inv(files.affine)
    parent = node.GetParentTransformNode()
    if files.deformable is None:
        mrml.set_affine(node, inverseAffine)
        node.SetAndObserveTransformNodeID(None)
        return []
    if parent is None or parent.GetAttribute(ROLE_ATTRIBUTE) != "inverse-affine":
        parent = scene.AddNewNodeByClass(
            "vtkMRMLLinearTransformNode", f"{node.GetName()} (inverse affine)"
        )
        parent.SetAttribute(ROLE_ATTRIBUTE, "inverse-affine")
    mrml.set_affine(parent, inverseAffine)
    parent.SetAndObserveTransformNodeID(None)
    deformable = slicer.vtkOrientedGridTransform()
    deformable.DeepCopy(files.deformable)  # its own copy: the forward grid node holds the other
    node.SetAndObserveTransformToParent(deformable)
    node.SetAndObserveTransformNodeID(parent.GetID())
    return [parent]


def gridNodeFor(scene, linear):
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
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", f"{linear.GetName()} (deformable)")
    node.SetAttribute(ROLE_ATTRIBUTE, "dense")
    return node


def placeInStudy(scene, reference, nodes: list) -> None:
    """Put ``nodes`` into the subject-hierarchy folder (study) of ``reference``, when it has one."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    item = hierarchy.GetItemByDataNode(reference)
    parent = hierarchy.GetItemParent(item) if item else 0
    if not parent or parent == hierarchy.GetSceneItemID():
        return
    for node in nodes:
        child = hierarchy.GetItemByDataNode(node)
        if child:
            hierarchy.SetItemParent(child, parent)
        else:
            hierarchy.CreateItem(parent, node)


def loadLabels(scene, warped, inputs: JobInputs, output) -> None:
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
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
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
        scene.RemoveNode(labelmap)


def readMatches(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed points, moving points (N, 3, LPS mm) and similarities from the library's matches.csv."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fixed = np.array([[float(r[f"fixed_{a}_lps"]) for a in "xyz"] for r in rows]).reshape(-1, 3)
    moving = np.array([[float(r[f"moving_{a}_lps"]) for a in "xyz"] for r in rows]).reshape(-1, 3)
    similarity = np.array([float(r["similarity"]) for r in rows])
    return fixed, moving, similarity


def copyVolumeDisplay(source, target) -> None:
    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    display, original = target.GetDisplayNode(), source.GetDisplayNode()
    if original is not None and display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(original.GetWindow(), original.GetLevel())
        if original.GetColorNodeID():
            display.SetAndObserveColorNodeID(original.GetColorNodeID())
