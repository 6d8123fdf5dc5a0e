"""The Slicer module, headless: real MRML from the slicer-core wheel, the real child process.

One registration runs through the module's logic (a child process, as in Slicer) on a small
synthetic pair whose fixed image has an oblique direction; the same registration runs in this
process through the library, and the scene is compared with it.
"""

from __future__ import annotations

import ast
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip(
    "slicer", reason="needs the slicer-core wheel (pip install slicer-core)"
)

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "SAMERegistration"
sys.path.insert(0, str(MODULE_DIR))

from SAMERegistrationModuleLib import devices, logic  # noqa: E402
from SAMERegistrationModuleLib.logic import InvalidInput, RegistrationLogic  # noqa: E402
from SAMERegistrationModuleLib.scenario import makeSyntheticPair, runScenario  # noqa: E402

from SAMERegistrationLib import mrml, register  # noqa: E402
from SAMERegistrationLib.synthetic import PHANTOM_LABELS  # noqa: E402

# Small and fast; the in-process comparison run uses the same values.
SETTINGS = dict(
    features="mind", device="cpu", spacing=4.5, coarseIterations=30, instanceIterations=10
)
LIBRARY_SETTINGS = dict(
    features="mind",
    device="cpu",
    working_spacing_mm=4.5,
    coarse__iterations=30,
    instance__iterations=10,
)


@pytest.fixture(scope="module")
def scene():
    """Slicer's application logic and module logics on a fresh scene, without Qt."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetModuleLogic("Colors", app.GetColorLogic())
    keep = [app]
    for name, cls in [
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Markups", slicer.vtkSlicerMarkupsLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("Transforms", slicer.vtkSlicerTransformLogic),
    ]:
        module_logic = cls()
        module_logic.SetMRMLScene(scene)
        module_logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, module_logic)
        keep.append(module_logic)
    slicer.mrmlScene = scene
    scene.keep = keep  # the logics live as long as the scene
    return scene


def add_volume(scene, image, name, cls="vtkMRMLScalarVolumeNode"):
    return mrml.update_volume_node_from_image(scene.AddNewNodeByClass(cls, name), image)


def oblique(image: sitk.Image, degrees: float = 8.0) -> sitk.Image:
    """The same voxels with the grid turned about z around its centre (an oblique direction)."""
    image = sitk.Image(image)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in image.GetSize()]))  # fmt: skip
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    half = np.array(image.GetSpacing()) * (np.array(image.GetSize()) - 1) / 2
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin((centre - direction @ half).tolist())
    return image


def snapshot(scene) -> list[tuple[str, int]]:
    """Every node of the scene and its modification time."""
    return [
        (scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime())
        for i in range(scene.GetNumberOfNodes())
    ]


@pytest.fixture(scope="module")
def run(scene):
    """The registration through the logic, and the same registration through the library."""
    pair = makeSyntheticPair()
    fixed_image = oblique(pair.fixed)
    fixed = add_volume(scene, fixed_image, "fixed")
    moving = add_volume(scene, pair.moving, "moving")
    labelmap = add_volume(scene, pair.moving_labels, "labels", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(moving)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, segmentation
    )
    for i in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        segment = segmentation.GetSegmentation().GetNthSegment(i)
        segment.SetName(PHANTOM_LABELS[segment.GetLabelValue()])
    scene.RemoveNode(labelmap)

    outputs = dict(
        outputVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped"),
        outputLabels=scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "warped segmentation"),
        outputFixedPoints=scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "fixed points"),
        outputMovingPoints=scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "moving points"),
        outputQaVolume=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "qa"),
    )
    registration = RegistrationLogic(scene)
    progress = []
    job = registration.register(
        fixed,
        moving,
        segmentation,
        waitForCompletion=True,
        onProgress=lambda *args: progress.append(args),
        **outputs,
        **SETTINGS,
    )
    result = register(
        mrml.image_from_volume_node(fixed), pair.moving, moving_labels=pair.moving_labels,
        **LIBRARY_SETTINGS,
    )  # fmt: skip
    return SimpleNamespace(
        job=job,
        logic=registration,
        result=result,
        pair=pair,
        fixed=fixed,
        moving=moving,
        segmentation=segmentation,
        progress=progress,
        **outputs,
    )


def random_fixed_points(grid, count=400, seed=3):
    rng = np.random.default_rng(seed)
    return grid.index_to_physical(rng.uniform(0, 1, (count, 3)) * (np.array(grid.size_xyz) - 1))


# ---- geometry ----------------------------------------------------------------------------------


def test_volume_round_trip_keeps_oblique_geometry(scene, tmp_path):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 2000, (7, 9, 11)).astype(np.int16))
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((12.5, -30.0, 7.25))
    image.SetDirection(sitk.VersorTransform((0.3, -0.2, 0.9), 0.6).GetMatrix())
    node = add_volume(scene, image, "oblique")

    back = mrml.image_from_volume_node(node)
    assert back.GetSize() == image.GetSize()
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)

    # Slicer's own RAS geometry agrees: voxel (3, 4, 5) lies at the LPS point with x, y negated.
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ras = slicer.util.arrayFromVTKMatrix(matrix) @ [3, 4, 5, 1]
    lps = image.TransformIndexToPhysicalPoint((3, 4, 5))
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)

    # and so do Slicer's file writers, read back by SimpleITK.
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "oblique.nrrd"))
    assert storage.WriteData(node)
    written = sitk.ReadImage(str(tmp_path / "oblique.nrrd"))
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-6)


def test_grid_transform_holds_displacement_in_ras_on_an_oblique_grid(scene):
    from SAMERegistrationLib.grid import Grid

    direction = np.array(sitk.VersorTransform((0.0, 0.0, 1.0), 0.5).GetMatrix()).reshape(3, 3)
    grid = Grid((6, 7, 8), (2.0, 3.0, 4.0), (5.0, -4.0, 3.0), direction)
    field = np.zeros((*grid.shape, 3))
    field[...] = (5.0, -2.0, 1.5)  # LPS mm, constant
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    mrml.set_displacement(node, field, grid)
    centre = grid.index_to_physical(np.array([[3.0, 3.0, 2.5]]))
    mapped = mrml.map_points_through(node, centre @ mrml.FLIP) @ mrml.FLIP
    np.testing.assert_allclose(mapped, centre + (5.0, -2.0, 1.5), atol=1e-6)
    np.testing.assert_allclose(
        slicer.util.arrayFromGridTransform(node)[0, 0, 0], (-5.0, 2.0, 1.5), atol=1e-6
    )
    scene.RemoveNode(node)


def synthetic_result():
    """A RegistrationResult with a strong affine and dense part, on an oblique fixed grid."""
    import torch

    from SAMERegistrationLib.alignment import Alignment
    from SAMERegistrationLib.config import RegistrationConfig
    from SAMERegistrationLib.grid import Grid, axis_aligned_grid_covering
    from SAMERegistrationLib.matching import Matches
    from SAMERegistrationLib.result import RegistrationResult

    direction = np.array(sitk.VersorTransform((0.2, 0.1, 1.0), 0.4).GetMatrix()).reshape(3, 3)
    fixed_grid = Grid((20, 24, 28), (3.0, 2.5, 3.5), (-40.0, -30.0, -20.0), direction)
    working = axis_aligned_grid_covering(fixed_grid.corners(), 4.0)
    points = working.voxel_centres()
    dense = np.stack(
        [
            8 * np.sin(points[..., 1] / 15),
            6 * np.cos(points[..., 2] / 12),
            5 * np.sin(points[..., 0] / 10),
        ]
    ).astype(np.float32)
    angle = np.radians(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    ) @ np.diag([1.1, 0.95, 1.05])
    affine[:3, 3] = (12.0, -7.0, 4.0)
    none = np.zeros((0, 3))
    alignment = Alignment(affine, torch.as_tensor(dense)[None], working)
    return RegistrationResult(
        fixed_grid, alignment, Matches(none, none, np.zeros(0)),
        RegistrationConfig(features="mind"), "cpu",
    )  # fmt: skip


def test_nodes_from_a_result_map_points_as_the_library(scene):
    """Linear under grid: p -> A (p + u(p)). The other nesting, p -> A p + u(A p), is far off."""
    result = synthetic_result()
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    affine, dense, working_grid = mrml.transform_parts_from_result(result)
    mrml.set_registration(linear, affine, grid, dense, working_grid)
    assert linear.GetParentTransformNode() is grid and grid.GetParentTransformNode() is None
    points = random_fixed_points(result.working_grid)
    library = result.map_points(points)
    mapped = mrml.map_points_through(linear, points @ mrml.FLIP) @ mrml.FLIP
    np.testing.assert_allclose(mapped, library, atol=1e-3)

    linear.SetAndObserveTransformNodeID(None)
    grid.SetAndObserveTransformNodeID(linear.GetID())
    other_nesting = mrml.map_points_through(grid, points @ mrml.FLIP) @ mrml.FLIP
    assert np.linalg.norm(other_nesting - library, axis=1).mean() > 2.0
    for node in (linear, grid):
        scene.RemoveNode(node)


def test_nodes_from_the_output_files_map_points_as_the_library(scene, tmp_path):
    from SAMERegistrationLib.export import write_outputs

    result = synthetic_result()
    moving = result.fixed_grid.apply_to(
        sitk.GetImageFromArray(np.arange(20 * 24 * 28, dtype=np.float32).reshape(20, 24, 28))
    )
    paths = write_outputs(result, tmp_path / "out", moving)
    affine, dense, grid = mrml.transform_parts_from_files(paths["affine"], paths["transform"])
    np.testing.assert_allclose(affine, result.affine, atol=1e-9)
    assert grid.matches(result.fixed_grid)  # the dense part on the fixed grid, oblique
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    mrml.set_registration(linear, affine, grid_node, dense, grid)
    centres = result.fixed_grid.voxel_centres().reshape(-1, 3)[::7]
    np.testing.assert_allclose(
        mrml.map_points_through(linear, centres @ mrml.FLIP) @ mrml.FLIP,
        result.map_points(centres),
        atol=1e-3,
    )
    for node in (linear, grid_node):
        scene.RemoveNode(node)


# ---- a registration through the logic ----------------------------------------------------------


def test_run_reports_progress_per_stage(run):
    assert run.job.state == "completed"
    stages = [stage for stage, *_ in run.progress]
    assert stages[0] == "prepare" and stages[-1] == "finish"
    assert {"features", "matching", "affine", "coarse", "instance"} <= set(stages)
    overall = [fraction for *_, fraction in run.progress]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)


def test_transform_nodes_are_nested_with_reference_roles(run):
    linear, grid = run.job.outputs.transform, run.job.outputs.gridTransform
    assert linear.IsA("vtkMRMLLinearTransformNode")
    assert grid.IsA("vtkMRMLGridTransformNode")
    assert linear.GetParentTransformNode() is grid
    assert grid.GetParentTransformNode() is None
    assert run.moving.GetParentTransformNode() is linear
    assert grid.GetAttribute(logic.ROLE_ATTRIBUTE) == "dense"
    for node in (linear, grid):
        assert node.GetNodeReference(node.GetFixedNodeReferenceRole()) is run.fixed
        assert node.GetNodeReference(node.GetMovingNodeReferenceRole()) is run.moving
    # The grid is stored in the resampling direction (FromParent), on the oblique fixed grid.
    assert grid.GetTransformFromParentAs("vtkOrientedGridTransform") is not None
    np.testing.assert_allclose(
        slicer.util.arrayFromVTKMatrix(
            grid.GetTransformFromParentAs("vtkOrientedGridTransform").GetGridDirectionMatrix()
        )[:3, :3],
        mrml.FLIP @ run.result.fixed_grid.direction,
        atol=1e-9,
    )
    np.testing.assert_allclose(
        run.result.affine, np.array(run.job.report["affine_matrix"]), atol=1e-6
    )


def test_point_mapped_through_the_nodes_equals_the_library_map(run):
    linear = run.job.outputs.transform
    grid = run.result.fixed_grid
    points = random_fixed_points(grid)
    library = run.result.map_points(points)
    through_nodes = mrml.map_points_through(linear, points @ mrml.FLIP) @ mrml.FLIP
    # Between voxel centres the grid node interpolates the field sampled on the fixed grid.
    np.testing.assert_allclose(through_nodes, library, atol=0.15)
    centres = grid.index_to_physical(np.argwhere(np.ones(grid.shape))[::53][:, ::-1].astype(float))
    np.testing.assert_allclose(
        mrml.map_points_through(linear, centres @ mrml.FLIP) @ mrml.FLIP,
        run.result.map_points(centres),
        atol=2e-3,
    )


def test_warped_volume_equals_the_library_warp(run):
    warped = run.outputVolume
    assert mrml.grid_from_volume_node(warped).matches(run.result.fixed_grid)
    assert warped.GetParentTransformNode() is None
    library = sitk.GetArrayFromImage(run.result.warp(run.pair.moving)).astype(np.float64)
    slicer_values = slicer.util.arrayFromVolume(warped).astype(np.float64)
    # Compare where the map stays inside the moving image (outside, Slicer pads with 0 and the
    # library with the image minimum).
    grid = run.result.fixed_grid
    zyx = np.argwhere(np.ones(grid.shape))
    moved = run.result.map_points(grid.index_to_physical(zyx[:, ::-1].astype(float)))
    index = np.array([run.pair.moving.TransformPhysicalPointToContinuousIndex(p) for p in moved])
    inside = np.all((index > 0.5) & (index < np.array(run.pair.moving.GetSize()) - 1.5), axis=1)
    assert inside.mean() > 0.5
    difference = np.abs(slicer_values - library)[tuple(zyx[inside].T)]
    assert difference.max() <= 1.0 + 1e-6  # int16 voxels: rounding only


def test_warped_segmentation_equals_the_library_warp(run, scene):
    output = run.outputLabels
    names = {
        output.GetSegmentation().GetNthSegment(i).GetName()
        for i in range(output.GetSegmentation().GetNumberOfSegments())
    }
    assert names == set(PHANTOM_LABELS.values())
    library = sitk.GetArrayFromImage(run.result.warp(run.pair.moving_labels, labels=True))
    for value, name in PHANTOM_LABELS.items():
        segment_id = output.GetSegmentation().GetSegmentIdBySegmentName(name)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            output, [segment_id], labelmap, run.fixed
        )
        mask = slicer.util.arrayFromVolume(labelmap) > 0
        scene.RemoveNode(labelmap)
        np.testing.assert_array_equal(mask, library == value, err_msg=name)


def test_point_lists_carry_positions_labels_and_similarities(run):
    matches = run.result.matches
    fixed_points, moving_points = run.outputFixedPoints, run.outputMovingPoints
    assert fixed_points.GetNumberOfControlPoints() == len(matches) > 10
    assert moving_points.GetNumberOfControlPoints() == len(matches)
    fixed_ras = slicer.util.arrayFromMarkupsControlPoints(fixed_points)  # local coordinates
    moving_ras = slicer.util.arrayFromMarkupsControlPoints(moving_points)
    np.testing.assert_allclose(fixed_ras, matches.fixed @ mrml.FLIP, atol=2e-3)
    np.testing.assert_allclose(moving_ras, matches.moving @ mrml.FLIP, atol=2e-3)
    for i, score in enumerate(matches.similarity):
        assert fixed_points.GetNthControlPointLabel(i) == f"F-{i + 1}"
        assert moving_points.GetNthControlPointLabel(i) == f"M-{i + 1}"
        for node in (fixed_points, moving_points):
            described = float(node.GetNthControlPointDescription(i).split()[-1])
            assert described == pytest.approx(score, abs=1e-3)
            assert node.GetNthControlPointLocked(i)
            assert node.GetNthControlPointSelected(i) == (round(score, 4) >= mrml.HIGH_SIMILARITY)
    # The moving points are shown like the moving volume: under the transform, in fixed space.
    assert moving_points.GetParentTransformNode() is run.job.outputs.transform
    assert fixed_points.GetParentTransformNode() is None
    world = np.array([moving_points.GetNthControlPointPositionWorld(i) for i in range(5)])
    back = mrml.map_points_through(run.job.outputs.transform, world)
    np.testing.assert_allclose(back, moving_ras[:5], atol=0.05)


def test_qa_volume_shows_displacement_magnitude(run, scene):
    qa = run.outputQaVolume
    assert mrml.grid_from_volume_node(qa).matches(run.result.fixed_grid)
    grid = run.result.fixed_grid
    zyx = np.argwhere(np.ones(grid.shape))[::97]
    points = grid.index_to_physical(zyx[:, ::-1].astype(float))
    expected = np.linalg.norm(run.result.map_points(points) - points, axis=1)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(qa)[tuple(zyx.T)], expected, atol=2e-3)

    # The Jacobian of a pure affine map is its determinant everywhere.
    affine = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.diag([1.1, 0.9, 1.05, 1.0])
    matrix[:3, 3] = (3.0, -2.0, 1.0)
    mrml.set_affine(affine, matrix)
    jacobian = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    run.logic.computeQaVolume(affine, run.fixed, jacobian, "jacobian")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(jacobian), 1.1 * 0.9 * 1.05, rtol=1e-5)
    for node in (affine, jacobian):
        scene.RemoveNode(node)


def test_saved_nodes_reload_identically(run, scene, tmp_path):
    linear, grid = run.job.outputs.transform, run.job.outputs.gridTransform

    def save_and_load(node, storage_class, name):
        storage = getattr(slicer, storage_class)()
        storage.SetFileName(str(tmp_path / name))
        assert storage.WriteData(node), name
        loaded = scene.AddNewNodeByClass(node.GetClassName(), f"reloaded {name}")
        reader = getattr(slicer, storage_class)()
        reader.SetFileName(str(tmp_path / name))
        assert reader.ReadData(loaded), name
        return loaded

    linear2 = save_and_load(linear, "vtkMRMLTransformStorageNode", "affine.h5")
    grid2 = save_and_load(grid, "vtkMRMLTransformStorageNode", "dense.h5")
    volume2 = save_and_load(run.outputVolume, "vtkMRMLVolumeArchetypeStorageNode", "warped.nrrd")
    points2 = save_and_load(
        run.outputFixedPoints, "vtkMRMLMarkupsJsonStorageNode", "fixed_points.mrk.json"
    )

    np.testing.assert_allclose(
        slicer.util.arrayFromTransformMatrix(linear2),
        slicer.util.arrayFromTransformMatrix(linear),
        atol=1e-9,
    )
    np.testing.assert_allclose(
        slicer.util.arrayFromGridTransform(grid2),
        slicer.util.arrayFromGridTransform(grid),
        atol=1e-5,
    )
    linear2.SetAndObserveTransformNodeID(grid2.GetID())
    # Slicer's reader picks cubic interpolation for a grid; the library (and ITK) interpolate
    # linearly, as the node was made.
    grid2.GetTransformFromParent().SetInterpolationModeToLinear()
    points = random_fixed_points(run.result.fixed_grid, 50) @ mrml.FLIP
    np.testing.assert_allclose(
        mrml.map_points_through(linear2, points), mrml.map_points_through(linear, points), atol=1e-4
    )
    np.testing.assert_array_equal(
        slicer.util.arrayFromVolume(volume2), slicer.util.arrayFromVolume(run.outputVolume)
    )
    assert mrml.grid_from_volume_node(volume2).matches(mrml.grid_from_volume_node(run.outputVolume))
    np.testing.assert_allclose(
        slicer.util.arrayFromMarkupsControlPoints(points2),
        slicer.util.arrayFromMarkupsControlPoints(run.outputFixedPoints),
        atol=1e-6,
    )
    for i in range(points2.GetNumberOfControlPoints()):
        assert points2.GetNthControlPointLabel(i) == run.outputFixedPoints.GetNthControlPointLabel(
            i
        )
        assert points2.GetNthControlPointDescription(
            i
        ) == run.outputFixedPoints.GetNthControlPointDescription(i)
    for node in (linear2, grid2, volume2, points2):
        scene.RemoveNode(node)


def test_find_match_recovers_the_run_correspondences(run):
    matches = run.result.matches
    feature_spacing = 2 * SETTINGS["spacing"]
    best = np.argsort(matches.similarity)[::-1][:5]
    for i in best:
        position, similarity = run.logic.findMatch(matches.moving[i] @ mrml.FLIP)
        distance = np.linalg.norm(position @ mrml.FLIP - matches.fixed[i])
        assert distance <= logic.MIND_SEARCH_RADIUS_MM + feature_spacing, (i, distance)
        assert similarity >= matches.similarity[i] - 0.02


def test_choosing_a_correspondence_centres_the_slice_views(run, scene):
    views = {}
    for name, volume in (("Red", run.fixed), ("Yellow", run.moving)):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        composite.SetBackgroundVolumeID(volume.GetID())
        views[name] = (slice_node, composite)
    fixed_position, moving_position = run.logic.correspondence(
        run.outputFixedPoints, run.outputMovingPoints, 3
    )
    np.testing.assert_allclose(
        fixed_position, run.outputFixedPoints.GetNthControlPointPositionWorld(3)
    )
    run.logic.jumpSlices(fixed_position, moving_position, run.moving)
    for name, expected in (("Red", fixed_position), ("Yellow", moving_position)):
        centre = slicer.util.arrayFromVTKMatrix(views[name][0].GetSliceToRAS())[:3, 3]
        np.testing.assert_allclose(centre, expected, atol=1e-6)
    with pytest.raises(InvalidInput, match="no correspondence"):
        run.logic.correspondence(run.outputFixedPoints, run.outputMovingPoints, 10_000)
    for slice_node, composite in views.values():
        scene.RemoveNode(slice_node)
        scene.RemoveNode(composite)


# ---- refused requests ------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors_and_leave_the_scene_unchanged(scene, run):
    flat = sitk.GetImageFromArray(np.zeros((1, 20, 30), np.int16))
    two_d = add_volume(scene, flat, "a slice")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")
    mrml.update_volume_node_from_image(labelmap, sitk.Cast(run.pair.moving_labels, sitk.sitkUInt8))
    transformed = add_volume(scene, run.pair.fixed, "a transformed volume")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "a transform")
    transformed.SetAndObserveTransformNodeID(transform.GetID())
    cases = [
        (dict(fixed=run.fixed, moving=None), "No moving volume is chosen"),
        (dict(fixed=run.fixed, moving=run.fixed), "both the fixed and the moving volume"),
        (dict(fixed=run.fixed, moving=two_d), "2-D image"),
        (dict(fixed=labelmap, moving=run.moving), "LabelMapVolumeNode"),
        (dict(fixed=transformed, moving=run.moving), "is under the transform 'a transform'"),
        (dict(fixed=run.fixed, moving=run.moving, outputVolume=run.moving), "is an input"),
        (dict(fixed=run.fixed, moving=run.moving, stages=()), "at least one stage"),
        (dict(fixed=run.fixed, moving=run.moving, device="gpu7"), "Device must be"),
        (dict(fixed=run.fixed, moving=run.moving, weights="/nowhere/sam.pth"), "does not exist"),
    ]
    registration = RegistrationLogic(scene)
    before = snapshot(scene)
    for arguments, message in cases:
        with pytest.raises(InvalidInput, match=message):
            registration.register(waitForCompletion=True, **arguments)
        assert snapshot(scene) == before, message
    assert registration.job is None
    for node in (two_d, labelmap, transformed, transform):
        scene.RemoveNode(node)


def test_cancel_stops_the_process_and_removes_its_files(scene, run):
    registration = RegistrationLogic(scene)
    before = snapshot(scene)
    finished = []
    job = registration.register(
        run.fixed, run.moving, onFinished=finished.append, **{**SETTINGS, "spacing": 2.0}
    )
    deadline = time.monotonic() + 60
    while not job.stage and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.stage, "the process reported no progress"
    pid = job.process.process.pid
    job.cancel()
    assert job.state == "cancelled" and finished == [job]
    assert job.process.process.returncode is not None
    if os.name != "nt":
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the whole process group is gone
    assert not job.folder.exists()
    assert snapshot(scene) == before
    assert registration.job is None


def test_a_failing_run_reports_the_library_error_and_changes_nothing(scene, run):
    registration = RegistrationLogic(scene)
    before = snapshot(scene)
    # No correspondence reaches this similarity: the library refuses to fit the affine.
    with pytest.raises(logic.RegistrationFailed) as failure:
        registration.register(
            run.fixed, run.moving, waitForCompletion=True, **{**SETTINGS, "threshold": 0.999}
        )
    message = str(failure.value)
    assert "match" in message and "Traceback" not in message and not message.startswith("error")
    assert not failure.value.deviceFailure  # a CPU run: nothing to fall back to
    assert snapshot(scene) == before


# ---- the module's own test, the panel, the build ------------------------------------------------


def test_module_self_test_scenario(scene):
    summary = runScenario(RegistrationLogic(scene), scene)
    assert summary["error_after_mm"] < summary["error_before_mm"]


def test_ui_file_parses_and_has_every_widget_the_code_uses():
    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "SAMERegistration.ui").getroot()
    names = {widget.get("name") for widget in ui.iter("widget")}
    source = (MODULE_DIR / "SAMERegistration.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the widget uses no .ui names?"
    assert used <= names, f"missing in the .ui file: {sorted(used - names)}"
    # Every bound widget names a field of the parameter node.
    bound = {
        prop.find("string").text
        for prop in ui.iter("property")
        if prop.get("name") == "SlicerParameterName"
    }
    tree = ast.parse(source)
    wrapper = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == "SAMERegistrationParameterNode"
    )
    fields = {
        statement.target.id for statement in wrapper.body if isinstance(statement, ast.AnnAssign)
    }
    assert bound <= fields, f"unknown parameters: {sorted(bound - fields)}"


def test_cmake_installs_every_module_file():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    for path in sorted((MODULE_DIR / "SAMERegistrationModuleLib").glob("*.py")):
        assert f"SAMERegistrationModuleLib/{path.name}" in cmake, path.name
    for resource in re.findall(r"(Resources/\S+)", cmake):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "SAMERegistration")).is_file()
    assert "slicerMacroBuildScriptedModule" in cmake and "slicer_add_python_unittest" in cmake


def test_settings_become_the_command_line_the_library_reads():
    from SAMERegistrationLib import cli
    from SAMERegistrationLib.config import STAGES
    from SAMERegistrationLib.pipeline import STEPS

    settings = logic.RegistrationSettings(
        stages=("affine", "instance"), features="mind", device="cuda:1", spacing=3.0,
        threshold=0.65, coarseIterations=7, instanceIterations=9, seed=4,
    )  # fmt: skip
    args = cli._register_parser().parse_args(["f.nii", "m.nii", "-o", "out", *settings.arguments()])
    config = cli.build_config(args)
    assert (config.affine.enabled, config.coarse.enabled, config.deform.enabled) == (
        True,
        False,
        False,
    )
    assert config.instance.enabled and config.features == "mind" and config.device == "cuda:1"
    assert config.working_spacing_mm == 3.0 and config.matching.similarity_threshold == 0.65
    assert (config.coarse.iterations, config.instance.iterations, config.seed) == (7, 9, 4)
    assert logic.STEPS == STEPS and logic.STAGES == STAGES


def test_devices_from_nvidia_smi():
    gpus = devices.parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559\n1, Quadro P1000, 4096\nbad\n")
    assert [gpu.device for gpu in gpus] == ["cuda:0", "cuda:1"]
    choices = devices.device_choices(gpus)
    assert [device for _, device in choices] == ["auto", "cuda:0", "cuda:1", "cpu"]
    assert "80 GiB" in choices[1][0]
    assert devices.device_choices([]) == [("Auto (CPU: no GPU found)", "auto"), ("CPU", "cpu")]
    assert "No NVIDIA GPU" in devices.describe_gpus([])
    assert "Less than" in devices.describe_gpus(gpus[1:])
    assert isinstance(devices.detect_gpus(), list)


def test_mrml_conversions_import_slicer_only_when_called():
    """The library must import where Slicer is absent: no top-level slicer, vtk or qt import."""
    tree = ast.parse((REPO / "SAMERegistrationLib" / "mrml.py").read_text())
    imported = []
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            imported += [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            imported.append(statement.module or "")
    assert not {name.split(".")[0] for name in imported} & {"slicer", "vtk", "qt", "ctk"}


def test_rerun_never_touches_user_nodes_and_keeps_its_grid(run, scene):
    """Runs last: it changes the transform of the first run."""
    linear, grid = run.job.outputs.transform, run.job.outputs.gridTransform
    registration = RegistrationLogic(scene)
    # A deformable rerun refills the grid this module made for the transform, not a new one.
    assert registration._gridNodeFor(linear) is grid

    # Under a transform of the user's, an affine-only run detaches it and leaves it as it was.
    users = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "the user's transform")
    linear.SetAndObserveTransformNodeID(users.GetID())
    created = registration._gridNodeFor(linear)
    assert created is not users and created.GetAttribute(logic.ROLE_ATTRIBUTE) == "dense"
    scene.RemoveNode(created)
    grids = scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode")
    stamp = users.GetMTime()
    job = registration.register(
        run.fixed, run.moving, outputTransform=linear, waitForCompletion=True,
        **{**SETTINGS, "stages": ("affine",)},
    )  # fmt: skip
    assert job.outputs.gridTransform is None
    assert linear.GetParentTransformNode() is None
    assert users.GetMTime() == stamp
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == grids
    assert scene.GetNodeByID(grid.GetID()) is grid  # the earlier grid is kept, not deleted
    np.testing.assert_allclose(
        slicer.util.arrayFromTransformMatrix(linear),
        mrml.matrix_lps_to_ras(np.linalg.inv(np.array(job.report["affine_matrix"]))),
        atol=1e-6,
    )
