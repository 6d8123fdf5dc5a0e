"""The Slicer module, headless: real MRML from the slicer-core wheel, the real child process.

One registration runs through the module's logic (a child process, as in Slicer) on a small
synthetic pair whose fixed image has an oblique direction; the same registration runs in this
process through the library, and the scene is compared with it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
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

from conftest import torch_threads  # noqa: E402
from SAMERegistrationModuleLib import devices, inspection, sceneio, settings  # noqa: E402
from SAMERegistrationModuleLib.logic import RegistrationLogic  # noqa: E402
from SAMERegistrationModuleLib.scenario import makeSyntheticPair, runScenario  # noqa: E402
from SAMERegistrationModuleLib.settings import InvalidInput  # noqa: E402
from slice_rendering import body_centre, body_difference, render_views  # noqa: E402
from slicer_scene import headless_scene  # noqa: E402

from SAMERegistrationLib import mrml, register  # noqa: E402
from SAMERegistrationLib.errors import RegistrationFailed  # noqa: E402
from SAMERegistrationLib.synthetic import PHANTOM_LABELS  # noqa: E402

# Small and fast; the in-process comparison run uses the same values.
SETTINGS = dict(
    features="mind", device="cpu", spacing=4.5, coarseIterations=100, instanceIterations=10
)
LIBRARY_SETTINGS = dict(
    features="mind",
    device="cpu",
    working_spacing_mm=4.5,
    coarse__iterations=100,
    instance__iterations=10,
)


@pytest.fixture(scope="module")
def scene():
    return headless_scene()


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
    # The same registration in this process, on as many torch threads as the logic's child
    # process used (earlier tests may have changed this process's): the optimisers' sums, and
    # so the fields, depend on the thread count in their last digits.
    with torch_threads(child_torch_threads()):
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


def child_torch_threads() -> int:
    """torch's thread count in a fresh process with this environment, as the logic starts one."""
    code = "import torch; print(torch.get_num_threads())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


def random_fixed_points(grid, count=400, seed=3):
    rng = np.random.default_rng(seed)
    return grid.index_to_physical(rng.uniform(0, 1, (count, 3)) * (np.array(grid.size_xyz) - 1))


# ---- geometry ----------------------------------------------------------------------------------


# ---- a registration through the logic ----------------------------------------------------------


def test_run_reports_progress_per_stage(run):
    assert run.job.state.value == "completed"
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
    assert grid.GetAttribute(settings.ROLE_ATTRIBUTE) == "dense"
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
    # At them the node holds the library's own values (float32).
    np.testing.assert_allclose(
        mrml.map_points_through(linear, centres @ mrml.FLIP) @ mrml.FLIP,
        run.result.map_points(centres),
        atol=1e-3,
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
    # int16 voxels: rounding.
    assert difference.max() <= 1.0 + 1e-6


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
        assert distance <= inspection.MIND_SEARCH_RADIUS_MM + feature_spacing, (i, distance)
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
    assert job.state.value == "cancelled" and finished == [job]
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
    with pytest.raises(RegistrationFailed) as failure:
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
    source = (MODULE_DIR / "SAMERegistration.py").read_text(encoding="utf-8")
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
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for path in sorted((MODULE_DIR / "SAMERegistrationModuleLib").glob("*.py")):
        assert f"SAMERegistrationModuleLib/{path.name}" in cmake, path.name
    for resource in re.findall(r"(Resources/\S+)", cmake):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "SAMERegistration")).is_file()
    assert "slicerMacroBuildScriptedModule" in cmake and "slicer_add_python_unittest" in cmake


def test_settings_become_the_command_line_the_library_reads():
    from SAMERegistrationLib import cli
    from SAMERegistrationLib.config import STAGES, STEPS
    from SAMERegistrationLib.pipeline import STEPS as PIPELINE_STEPS

    assert PIPELINE_STEPS == STEPS

    options = settings.RegistrationSettings(
        stages=("affine", "instance"), features="mind", device="cuda:1", spacing=3.0,
        threshold=0.65, coarseIterations=7, instanceIterations=9, seed=4, keepPlacement=True,
    )  # fmt: skip
    args = cli._register_parser().parse_args(["f.nii", "m.nii", "-o", "out", *options.arguments()])
    config = cli.build_config(args)
    assert (config.affine.enabled, config.coarse.enabled, config.deform.enabled) == (
        True,
        False,
        False,
    )
    assert config.instance.enabled and config.features == "mind" and config.device == "cuda:1"
    assert config.working_spacing_mm == 3.0 and config.matching.similarity_threshold == 0.65
    assert (config.coarse.iterations, config.instance.iterations, config.seed) == (7, 9, 4)
    assert config.initialisation == "identity"  # registered as placed
    default = settings.RegistrationSettings().arguments()
    args = cli._register_parser().parse_args(["f.nii", "m.nii", "-o", "out", *default])
    assert cli.build_config(args).initialisation == "search"
    from SAMERegistrationModuleLib import job

    assert job.STEPS is STEPS and settings.STAGES is STAGES  # one vocabulary, imported
    from SAMERegistrationLib.config import FEATURES, SPACING_RANGE_MM

    vocabulary = {STAGES, STEPS, FEATURES, SPACING_RANGE_MM}
    for path in MODULE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Tuple | ast.List) and node.elts:
                try:
                    value = tuple(ast.literal_eval(node))
                except ValueError:
                    continue
                assert value not in vocabulary, f"{path.name}:{node.lineno} redefines {value}"
            assert not (isinstance(node, ast.ClassDef) and node.name == "RegistrationFailed")


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


def test_rerun_never_touches_user_nodes_and_keeps_its_grid(run, scene):
    """Runs last: it changes the transform of the first run."""
    linear, grid = run.job.outputs.transform, run.job.outputs.gridTransform
    registration = RegistrationLogic(scene)
    # A deformable rerun refills the grid this module made for the transform, not a new one.
    assert sceneio.gridNodeFor(scene, linear) is grid

    # Under a transform of the user's, an affine-only run detaches it and leaves it as it was.
    users = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "the user's transform")
    linear.SetAndObserveTransformNodeID(users.GetID())
    created = sceneio.gridNodeFor(scene, linear)
    assert created is not users and created.GetAttribute(settings.ROLE_ATTRIBUTE) == "dense"
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


# ---- a run must be safe against scene changes ---------------------------------------------------


@pytest.fixture
def fresh_scene(scene):
    """A scene of its own with the synthetic pair; slicer.mrmlScene is restored afterwards."""
    own = headless_scene()
    pair = makeSyntheticPair()
    own.pair = pair
    own.fixed = add_volume(own, pair.fixed, "fixed")
    own.moving = add_volume(own, pair.moving, "moving")
    yield own
    slicer.mrmlScene = scene


def run_until(registration, fixed, moving, stage, action, **kwargs):
    """Register, calling ``action`` once when the child reports ``stage``; the RegistrationFailed
    raised, or None."""
    done = []

    def on_progress(current, *_):
        if current == stage and not done:
            done.append(current)
            action()

    try:
        registration.register(
            fixed, moving, waitForCompletion=True, onProgress=on_progress,
            **{**SETTINGS, "stages": ("affine", "coarse"), **kwargs},
        )  # fmt: skip
    except RegistrationFailed as failure:
        assert done, "the action never ran"
        return failure
    return None


def test_deleting_the_output_transform_during_a_run_cancels_it(fresh_scene):
    scene = fresh_scene
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "output")
    registration = RegistrationLogic(scene)
    before = [item for item in snapshot(scene) if item[0] != output.GetID()]
    failure = run_until(
        registration, scene.fixed, scene.moving, "features", lambda: scene.RemoveNode(output),
        outputTransform=output,
    )  # fmt: skip
    assert failure is not None and "output" in str(failure) and "deleted" in str(failure)
    assert snapshot(scene) == before
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 0
    assert scene.moving.GetParentTransformNode() is None
    assert registration.job is None and registration.lastRun is None


def test_deleting_the_moving_volume_during_a_run_changes_nothing(fresh_scene):
    scene = fresh_scene
    output = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "output")
    matrix = np.diag([1.0, 2.0, 3.0, 1.0])
    output.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    registration = RegistrationLogic(scene)
    moving = scene.moving
    before = [item for item in snapshot(scene) if item[0] != moving.GetID()]
    failure = run_until(
        registration, scene.fixed, moving, "features", lambda: scene.RemoveNode(moving),
        outputTransform=output,
    )  # fmt: skip
    assert failure is not None and "moving" in str(failure)
    assert snapshot(scene) == before
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 0
    np.testing.assert_array_equal(slicer.util.arrayFromTransformMatrix(output), matrix)


def test_closing_the_scene_during_a_scripted_run_leaves_it_empty(fresh_scene):
    scene = fresh_scene
    registration = RegistrationLogic(scene)
    failure = run_until(registration, scene.fixed, scene.moving, "features", scene.Clear)
    assert failure is not None and "closed" in str(failure)
    for cls in ("vtkMRMLGridTransformNode", "vtkMRMLLinearTransformNode", "vtkMRMLVolumeNode"):
        assert scene.GetNumberOfNodesByClass(cls) == 0, cls
    assert registration.job is None


def test_results_are_not_loaded_into_a_scene_that_lost_a_node(fresh_scene):
    """Even unobserved, loading checks every node first and changes nothing when one is gone."""
    scene = fresh_scene
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "points")
    registration = RegistrationLogic(scene)
    job = registration.register(
        scene.fixed, scene.moving, outputFixedPoints=points, **{**SETTINGS, "stages": ("affine",)}
    )
    registration.stopWatching()
    job.process.process.wait(120)
    scene.RemoveNode(points)
    before = snapshot(scene)
    while not job.poll():
        time.sleep(0.05)
    assert job.state.value == "failed" and "left the scene" in job.error
    assert snapshot(scene) == before
    assert scene.moving.GetParentTransformNode() is None


@pytest.fixture
def small_run(fresh_scene):
    """A completed affine + coarse run in its own scene, the fixed volume in a study."""
    scene = fresh_scene
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(
        hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient"), "study"
    )
    hierarchy.CreateItem(study, scene.fixed)
    scene.fixedPoints = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    scene.movingPoints = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M")
    scene.before = render_views(scene, scene.fixed, scene.moving, body_centre(scene.fixed))
    scene.logic = RegistrationLogic(scene)
    scene.job = scene.logic.register(
        scene.fixed, scene.moving, outputFixedPoints=scene.fixedPoints,
        outputMovingPoints=scene.movingPoints, waitForCompletion=True,
        **{**SETTINGS, "stages": ("affine", "coarse")},
    )  # fmt: skip
    scene.hierarchy, scene.study = hierarchy, study
    return scene


def test_rendered_slice_views_align_after_a_registration(small_run):
    """Slicer's slice logic draws the fixed volume under the moving one (through the result
    transform): the grey-value difference inside the body drops."""
    scene = small_run
    after = render_views(scene, scene.fixed, scene.moving, body_centre(scene.fixed))
    assert scene.moving.GetParentTransformNode() is scene.job.outputs.transform
    before_difference, after_difference = body_difference(scene.before), body_difference(after)
    assert after_difference < 0.6 * before_difference, (before_difference, after_difference)


def test_inverse_transform_output_undoes_the_registration(small_run):
    scene = small_run
    inverse = scene.AddNewNodeByClass("vtkMRMLTransformNode", "inverse")
    job = scene.logic.register(
        scene.fixed, scene.moving, outputTransform=scene.job.outputs.transform,
        outputInverseTransform=inverse, waitForCompletion=True,
        **{**SETTINGS, "stages": ("affine", "coarse")},
    )  # fmt: skip
    assert inverse.GetParentTransformNode().GetAttribute(settings.ROLE_ATTRIBUTE) == (
        "inverse-affine"
    )
    grid = mrml.grid_from_volume_node(scene.fixed)
    points = (
        grid.index_to_physical(
            np.random.default_rng(1).uniform(0.2, 0.8, (50, 3)) * (np.array(grid.size_xyz) - 1)
        )
        @ mrml.FLIP
    )  # RAS, inside the fixed volume
    moved = mrml.map_points_through(job.outputs.transform, points)  # fixed -> moving
    back = mrml.map_points_through(inverse, moved)  # moving -> fixed
    assert np.linalg.norm(moved - points, axis=1).mean() > 2.0
    np.testing.assert_allclose(back, points, atol=0.05)


def test_run_outputs_join_the_fixed_volume_study_and_keep_the_report(small_run, tmp_path):
    scene = small_run
    linear, grid = scene.job.outputs.transform, scene.job.outputs.gridTransform
    for node in (linear, grid, scene.fixedPoints, scene.movingPoints):
        item = scene.hierarchy.GetItemByDataNode(node)
        assert item and scene.hierarchy.GetItemParent(item) == scene.study, node.GetName()
    report = json.loads(linear.GetAttribute(settings.REPORT_ATTRIBUTE))
    assert report["device"].lower().startswith("cpu") and report["features"] == "mind"
    assert {"SAMERegistrationLib", "torch", "numpy"} <= set(report["software"])
    assert report["config"]["coarse"]["iterations"] == SETTINGS["coarseIterations"]
    # Saved with the scene and read back.
    scene.SetSaveToXMLString(1)
    scene.Commit()
    reloaded = slicer.vtkMRMLScene()
    reloaded.SetLoadFromXMLString(1)
    reloaded.SetSceneXMLString(scene.GetSceneXMLString())
    reloaded.Import()
    copy = reloaded.GetNodeByID(linear.GetID())
    assert json.loads(copy.GetAttribute(settings.REPORT_ATTRIBUTE)) == report


def test_find_match_is_reset_when_the_inputs_change_or_the_scene_closes(small_run, monkeypatch):
    scene = small_run
    logic_ = scene.logic
    monkeypatch.setitem(sys.modules, "torch", None)  # the search must not need PyTorch
    position = slicer.util.arrayFromMarkupsControlPoints(scene.movingPoints)[0]
    found, similarity = logic_.findMatch(position)
    assert np.isfinite(found).all() and -1.0 <= similarity <= 1.0

    voxels = slicer.util.arrayFromVolume(scene.moving)
    voxels[:] = np.roll(voxels, 3, axis=0)
    slicer.util.arrayFromVolumeModified(scene.moving)
    with pytest.raises(InvalidInput, match="changed"):
        logic_.findMatch(position)
    with pytest.raises(InvalidInput, match="Run a registration first"):
        logic_.findMatch(position)

    logic_.lastRun = scene.job  # as after a new run; then the scene closes
    logic_._matchSearch = None
    scene.Clear(0)
    assert logic_.lastRun is None
    with pytest.raises(InvalidInput, match="Run a registration first"):
        logic_.findMatch(position)


# ---- other defects ------------------------------------------------------------------------------


def test_a_transform_already_on_the_moving_volume_is_refused_clearly(scene, run):
    registration = RegistrationLogic(scene)
    users = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "the user's transform")
    volume = add_volume(scene, run.pair.moving, "moving under a transform")
    volume.SetAndObserveTransformNodeID(users.GetID())
    before = snapshot(scene)
    with pytest.raises(
        InvalidInput, match="under the transform 'the user's transform'.*harden"
    ) as refused:
        registration.register(run.fixed, volume, waitForCompletion=True, **SETTINGS)
    assert snapshot(scene) == before
    # The option it names is on the panel, under that name.
    option = "Start from the moving volume's placement"
    assert f"tick '{option}'" in str(refused.value)
    ui = ET.parse(MODULE_DIR / "Resources" / "UI" / "SAMERegistration.ui").getroot()
    assert option in {text.text for text in ui.iter("string")}
    # Chosen as the output transform, it is replaced on purpose: no refusal.
    registration.checkInputs(run.fixed, volume, outputs=settings.RegistrationOutputs(users))
    for node in (volume, users):
        scene.RemoveNode(node)


def test_a_process_killed_for_memory_says_so(scene, run):
    if os.name == "nt":
        pytest.skip("POSIX signals")
    registration = RegistrationLogic(scene)
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    registration._command = lambda: [sys.executable, "-c", suicide]
    before = snapshot(scene)
    with pytest.raises(RegistrationFailed, match="ran out of memory") as failure:
        registration.register(run.fixed, run.moving, waitForCompletion=True, **SETTINGS)
    assert "SIGKILL" in str(failure.value) and "exited with code" not in str(failure.value)
    assert snapshot(scene) == before


def test_place_mode_follows_the_toolbar_and_restores_persistence(scene):
    selection = scene.app.GetSelectionNode()
    interaction = scene.app.GetInteractionNode()
    query = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "queries")
    interaction.SetPlaceModePersistence(0)
    left = []
    placement = inspection.FindMatchPlacement(selection, interaction, lambda: left.append(1))
    placement.start(query)
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    assert selection.GetActivePlaceNodeID() == query.GetID()
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert interaction.GetPlaceModePersistence() == 1
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)  # left from the toolbar
    assert left == [1] and not placement.active
    assert interaction.GetPlaceModePersistence() == 0
    placement.start(query)
    placement.stop()  # the button unchecked
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    assert interaction.GetPlaceModePersistence() == 0 and left == [1]
    scene.RemoveNode(query)


def test_slice_nodes_are_listed_without_leaking_collections(scene):
    """GetNodesByClass returns a new vtkCollection that Python never frees; the module counts."""
    leaked = scene.GetNodesByClass("vtkMRMLSliceNode")
    assert leaked.GetReferenceCount() == 2  # why it is not used
    for path in MODULE_DIR.rglob("*.py"):
        assert ".GetNodesByClass(" not in path.read_text(encoding="utf-8"), path
    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    assert inspection.nodesByClass(scene, "vtkMRMLSliceNode")[-1] is slice_node
    scene.RemoveNode(slice_node)


def test_requirements_list_only_what_the_run_imports():
    """Each listed package is imported when the module runs; tqdm (bars only) is not needed."""
    from SAMERegistrationModuleLib import dependencies

    path = MODULE_DIR / "Resources" / "requirements.txt"
    listed = [re.split(r"[<>=!~;\[ ]", line)[0] for line in dependencies.requirements(path)]
    assert "tqdm" not in listed
    top_level = set()
    for source in [*(REPO / "SAMERegistrationLib").rglob("*.py"), *MODULE_DIR.rglob("*.py")]:
        for statement in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(statement, ast.Import):
                top_level |= {alias.name.split(".")[0] for alias in statement.names}
            elif isinstance(statement, ast.ImportFrom) and statement.module:
                top_level.add(statement.module.split(".")[0])
    assert set(listed) <= top_level
    assert dependencies.missingRequirements(path) == []


def test_module_loads_with_python_3_9_rules():
    """Slicer before 5.10 ships Python 3.9: no newer syntax in what Slicer's process imports, and
    no ``X | Y`` annotation evaluated at import (only under ``from __future__ import annotations``).
    """
    code = (
        "import sys; sys.modules['torch'] = None; import SAMERegistrationModuleLib.logic, "
        "SAMERegistrationModuleLib.devices, SAMERegistrationModuleLib.scenario, "
        "SAMERegistrationLib.mrml, SAMERegistrationLib.feature_export; "
        "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('SAMERegistration') and getattr(m, '__file__', None)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(MODULE_DIR)])},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = {Path(line) for line in done.stdout.split()} | {MODULE_DIR / "SAMERegistration.py"}
    assert any(f.name == "mrml.py" for f in files)
    for path in sorted(files):
        tree = ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))
        postponed = any(
            isinstance(s, ast.ImportFrom)
            and s.module == "__future__"
            and any(a.name == "annotations" for a in s.names)
            for s in tree.body
        )
        if postponed:
            continue
        annotations = [
            n.annotation for n in ast.walk(tree) if isinstance(n, ast.arg | ast.AnnAssign)
        ]
        annotations += [n.returns for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        unions = [
            a.lineno
            for a in annotations
            if a is not None
            and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(a))
        ]
        assert not unions, f"{path.name}: X | Y annotations at lines {unions}"


def test_extension_meets_the_index_conventions():
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    screenshot = re.search(r'EXTENSION_SCREENSHOTURLS "([^"]+)"', cmake)
    assert screenshot, "no screenshot URL"
    relative = screenshot.group(1).split("/main/")[-1]
    assert (REPO / relative).is_file(), relative
    assert "5.10" in cmake
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In 3D Slicer")[1].split("\n## ")[0]
    assert "5.10" in section and relative in section
    source = (MODULE_DIR / "SAMERegistration.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    citation = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CITATION"
    )
    assert " ".join(citation.split()) in " ".join(section.split())
    assert "DOCUMENTATION_URL" in source and "{url}" in source
    # The ctest self-test runs the panel test without PyTorch, and skips nothing.
    test_class = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and n.name == "SAMERegistrationTest"
    )
    run_test = next(n for n in test_class.body if getattr(n, "name", "") == "runTest")
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Call)
              and isinstance(n.func, ast.Attribute)}  # fmt: skip
    assert {"test_panelWithoutPyTorch", "test_registerSyntheticPair"} <= called
    assert "skipTest" not in ast.get_source_segment(source, test_class)
