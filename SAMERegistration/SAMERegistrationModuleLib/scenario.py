"""The module's self-test: register a small synthetic pair with a known map and check the scene.

Run by the module's Test class inside Slicer (ctest) and by the headless pytest suite, so both
check the same thing. It builds its data itself (no network) and takes seconds on a CPU.
"""

from __future__ import annotations

import numpy as np

# MIND features on a coarse grid with few iterations: fast, and still clearly better than before.
SETTINGS = dict(
    stages=("affine", "coarse"),
    features="mind",
    device="cpu",
    spacing=4.5,
    coarseIterations=100,  # fewer leave a coarse field too weak for the coarse.min_gain check
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def makeSyntheticPair():
    """A phantom CT and labels (moving), and a fixed image made by a known affine + smooth warp."""
    import SimpleITK as sitk

    from SAMERegistrationLib.grid import Grid
    from SAMERegistrationLib.synthetic import (
        affine_about_centre,
        known_pair,
        make_phantom,
        smooth_displacement,
    )

    moving, labels = make_phantom(size_xyz=(64, 56, 44), spacing=4.5)
    affine = affine_about_centre(moving, rotation_deg=(0, 0, 5), translation_mm=(8, -5, 4))
    warp = smooth_displacement(Grid.from_sitk(moving), magnitude_mm=5.0, seed=2)
    return known_pair(moving, sitk.CompositeTransform([affine, warp]), labels)


def runScenario(logic, scene) -> dict:
    """Register the synthetic pair through ``logic`` into ``scene`` and check every output.

    Returns a summary (errors before/after in mm, number of matches); raises AssertionError
    with what is wrong otherwise.
    """
    import SimpleITK as sitk

    from SAMERegistrationLib import mrml

    pair = makeSyntheticPair()

    def volume(cls: str, name: str, image):
        return mrml.update_volume_node_from_image(scene.AddNewNodeByClass(cls, name), image)

    fixed = volume("vtkMRMLScalarVolumeNode", "SAME test fixed", pair.fixed)
    moving = volume("vtkMRMLScalarVolumeNode", "SAME test moving", pair.moving)
    labels = volume("vtkMRMLLabelMapVolumeNode", "SAME test moving labels", pair.moving_labels)
    outputs = {
        "outputVolume": scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped"),
        "outputLabels": scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "warped labels"),
        "outputFixedPoints": scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F"),
        "outputMovingPoints": scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M"),
    }
    job = logic.register(fixed, moving, labels, waitForCompletion=True, **outputs, **SETTINGS)

    linear, grid = job.outputs.transform, job.outputs.gridTransform
    _require(job.state.value == "completed", f"the run ended as {job.state}: {job.error}")
    _require(linear is not None and linear.IsA("vtkMRMLLinearTransformNode"), "no linear node")
    _require(grid is not None and grid.IsA("vtkMRMLGridTransformNode"), "no grid node")
    _require(linear.GetParentTransformNode() is grid, "the linear node is not under the grid")
    _require(moving.GetParentTransformNode() is linear, "the moving volume is not transformed")
    _require(
        linear.GetNodeReference(linear.GetFixedNodeReferenceRole()) is fixed
        and linear.GetNodeReference(linear.GetMovingNodeReferenceRole()) is moving,
        "the transform does not record its fixed and moving volumes",
    )

    # The Slicer nodes must map fixed body points close to the known truth, closer than before.
    body = np.argwhere(sitk.GetArrayFromImage(pair.fixed) > -500)[::41][:, ::-1]
    points = np.array(
        [pair.fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in body]
    )
    mapped = mrml.map_points_through(linear, points @ mrml.FLIP) @ mrml.FLIP
    truth = pair.true_map(points)
    before = float(np.linalg.norm(truth - points, axis=1).mean())
    after = float(np.linalg.norm(truth - mapped, axis=1).mean())
    _require(after < 0.6 * before, f"mean error {after:.1f} mm after vs {before:.1f} mm before")

    fixedGrid = mrml.grid_from_volume_node(fixed)
    for key in ("outputVolume", "outputLabels"):
        _require(
            mrml.grid_from_volume_node(outputs[key]).matches(fixedGrid),
            f"the {key} node is not on the fixed grid",
        )
    warpedLabels = mrml.image_from_volume_node(outputs["outputLabels"])
    reference = sitk.GetArrayFromImage(pair.fixed_labels) > 0
    overlap = sitk.GetArrayFromImage(warpedLabels) > 0
    dice = 2 * (reference & overlap).sum() / max(reference.sum() + overlap.sum(), 1)
    _require(dice > 0.7, f"warped labels overlap the fixed labels poorly (Dice {dice:.2f})")

    fixedPoints, movingPoints = outputs["outputFixedPoints"], outputs["outputMovingPoints"]
    count = fixedPoints.GetNumberOfControlPoints()
    _require(count > 10, f"only {count} correspondences")
    _require(movingPoints.GetNumberOfControlPoints() == count, "point lists differ in length")
    for i in (0, count - 1):
        _require(
            fixedPoints.GetNthControlPointLabel(i) == f"F-{i + 1}"
            and movingPoints.GetNthControlPointLabel(i) == f"M-{i + 1}"
            and fixedPoints.GetNthControlPointDescription(i).startswith("similarity "),
            "point labels or descriptions are wrong",
        )
    return {"error_before_mm": before, "error_after_mm": after, "matches": count, "dice": dice}
