"""Exported files re-read by SimpleITK (and Slicer's storage) map points as the library does."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from SAMERegistrationLib import register
from SAMERegistrationLib.errors import OutputError
from SAMERegistrationLib.export import write_outputs
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.stages.deform import DEFAULT_WEIGHTS
from SAMERegistrationLib.synthetic import demo_pair


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    pair = demo_pair(seed=0)
    # An oblique fixed grid: the field must be written on the fixed image's own geometry.
    direction = sitk.VersorTransform((0, 0, 1), np.radians(10)).GetMatrix()
    fixed = sitk.Image(pair.fixed)
    fixed.SetDirection(direction)
    fixed_labels = sitk.Image(pair.fixed_labels)
    fixed_labels.SetDirection(direction)
    result = register(fixed, pair.moving, features="mind", fixed_labels=fixed_labels,
                      moving_labels=pair.moving_labels)  # fmt: skip
    out = tmp_path_factory.mktemp("out") / "result"
    paths = write_outputs(result, out, pair.moving, pair.moving_labels, inputs={"fixed": "mem"})
    return result, paths, fixed, pair


def inside_points(grid: Grid, count: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    index = rng.uniform(1, np.array(grid.size_xyz) - 2, size=(count, 3))
    return grid.index_to_physical(index)


def test_displacement_file_maps_points_like_the_library(registered):
    result, paths, fixed, _ = registered
    field = sitk.ReadImage(str(paths["transform"]), sitk.sitkVectorFloat64)
    assert Grid.from_sitk(field).matches(Grid.from_sitk(fixed))
    transform = sitk.DisplacementFieldTransform(field)
    grid = Grid.from_sitk(fixed)
    voxel_centres = grid.index_to_physical(np.array([[3, 4, 5], [20, 30, 10], [50, 40, 30]]))
    expected = result.map_points(voxel_centres)
    got = np.array([transform.TransformPoint(tuple(p)) for p in voxel_centres])
    np.testing.assert_allclose(got, expected, atol=1e-3)  # float32 storage
    points = inside_points(grid)
    got = np.array([transform.TransformPoint(tuple(p)) for p in points])
    # Between voxel centres ITK interpolates the field sampled on the 3 mm fixed grid, while the
    # library interpolates its 2 mm working grid: they differ by a small fraction of a voxel on
    # the whole, more where the learned stage's field changes fast (at the body's edge).
    error = np.linalg.norm(got - result.map_points(points), axis=1)
    assert error.mean() < 0.1 and np.percentile(error, 95) < 0.3, error
    assert error.max() < 0.5 * min(fixed.GetSpacing())


def test_deformable_file_and_affine_file_reproduce_the_whole_map(registered):
    result, paths, fixed, _ = registered
    assert paths["deformable"].name == "deformable.nii.gz"
    image = sitk.ReadImage(str(paths["deformable"]))
    assert image.GetPixelID() == sitk.sitkVectorFloat32
    assert Grid.from_sitk(image).matches(Grid.from_sitk(fixed))
    u = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x, 3) LPS mm
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["transform"]), sitk.sitkVectorFloat64))
    affine = sitk.ReadTransform(str(paths["affine"]))
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    p = Grid.from_sitk(fixed).voxel_centres()
    # The whole map is the affine applied after p + u(p); both files are float32.
    rebuilt = (p + u) @ matrix.T + np.array(affine.GetTranslation()) - p
    np.testing.assert_allclose(rebuilt, whole, atol=2e-3)
    assert np.abs(u).max() > 0.5  # the deformable stages moved something


def test_whole_map_precision_is_a_setting_and_features_are_resolved(tmp_path):
    pair = demo_pair(seed=0)
    result = register(pair.fixed, pair.moving, features="auto", coarse__iterations=5,
                      instance__enabled=False, deform__enabled=False,
                      export__field_precision="float64")  # fmt: skip
    paths = write_outputs(result, tmp_path / "f64", pair.moving)
    # "auto" is resolved once (the shipped SAM model is not preferred): the report says which.
    report = json.loads(paths["report"].read_text())
    assert result.features == report["features"] == report["config"]["features"] == "mind"
    image = sitk.ReadImage(str(paths["transform"]))
    assert image.GetPixelID() == sitk.sitkVectorFloat64
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), result.total_displacement())
    deformable = sitk.ReadImage(str(paths["deformable"]))
    assert deformable.GetPixelID() == sitk.sitkVectorFloat32  # the deformable part stays float32


def test_affine_file_is_the_affine_stage_in_itk_convention(registered):
    result, paths, _, _ = registered
    affine = sitk.ReadTransform(str(paths["affine"]))
    points = np.array([[0.0, 0.0, 0.0], [100.0, -50.0, 20.0]])
    got = np.array([affine.TransformPoint(tuple(p)) for p in points])
    expected = points @ result.affine[:3, :3].T + result.affine[:3, 3]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_warped_labels_equal_simpleitk_resampling(registered):
    _, paths, fixed, pair = registered
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(paths["transform"]), sitk.sitkVectorFloat64)
    )
    expected = sitk.Resample(pair.moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0)
    warped = sitk.ReadImage(str(paths["warped_labels"]))
    assert Grid.from_sitk(warped).matches(Grid.from_sitk(fixed))
    same = sitk.GetArrayFromImage(warped) == sitk.GetArrayFromImage(expected)
    assert same.mean() > 0.999  # float32 storage may flip a voxel on a label boundary


def test_registration_improves_dice_and_report_is_complete(registered):
    result, paths, _, _ = registered
    report = json.loads(paths["report"].read_text())
    assert report["metrics"]["mean_dice_after"] > report["metrics"]["mean_dice_before"] + 0.2
    assert report["metrics"]["folding_percent"] < 1.0
    for key in ("software", "device", "config", "stages", "total_seconds"):
        assert key in report
    # The 10-degree oblique fixed grid is left to the affine stage, and nothing is in doubt.
    assert report["stages"]["initial_pose"]["reoriented"] is False
    assert report["warnings"] == []
    # The demo runs on the 2 mm grid with MIND: the shipped SAM-deform network applies.
    deform = report["stages"]["deform"]
    assert deform["status"] == "done" and deform["weights"] == DEFAULT_WEIGHTS.name
    assert report["config"]["features"] == "mind"


def test_matches_csv_and_markups_agree(registered):
    result, paths, _, _ = registered
    with open(paths["matches_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.matches) > 50
    first = rows[0]
    np.testing.assert_allclose(
        [float(first[k]) for k in ("fixed_x_lps", "fixed_y_lps", "fixed_z_lps")],
        result.matches.fixed[0],
        atol=1e-3,
    )
    markups = json.loads(paths["matches_moving"].read_text())["markups"][0]
    assert markups["coordinateSystem"] == "LPS"
    point = markups["controlPoints"][0]
    assert point["label"] == "M-1"
    np.testing.assert_allclose(point["position"], result.matches.moving[0], atol=1e-3)
    assert point["description"] == f"similarity {result.matches.similarity[0]:.3f}"


def test_markups_load_in_slicer_with_ras_coordinates(registered):
    slicer = pytest.importorskip("slicer")
    result, paths, _, _ = registered
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerMarkupsLogic()
    logic.SetMRMLScene(scene)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(paths["matches_fixed"]))
    assert storage.ReadData(node)
    assert node.GetNumberOfControlPoints() == len(result.matches)
    ras = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, ras)
    lps = result.matches.fixed[0]
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-3)
    assert node.GetNthControlPointLabel(0) == "F-1"


def test_displacement_file_loads_in_slicer_as_resampling_transform(registered):
    slicer = pytest.importorskip("slicer")
    result, paths, fixed, _ = registered
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(paths["transform"]))
    assert storage.ReadData(node)
    from_parent = node.GetTransformFromParent()
    grid = Grid.from_sitk(fixed)
    # At the voxel centres the file holds the library's map itself (float32) ...
    centres = grid.index_to_physical(np.array([[3, 4, 5], [20, 30, 10], [50, 40, 30]]))
    for p, e in zip(centres, result.map_points(centres)):
        got = from_parent.TransformPoint([-p[0], -p[1], p[2]])
        np.testing.assert_allclose(got, [-e[0], -e[1], e[2]], atol=1e-3)
    # ... and between them, interpolated linearly as ITK does (Slicer's default is cubic), Slicer
    # reads the same field at the same places.
    assert from_parent.GetInterpolationModeAsString() == "Cubic"
    from_parent.SetInterpolationModeToLinear()
    itk = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(paths["transform"]), sitk.sitkVectorFloat64)
    )
    for p in inside_points(grid, count=5, seed=2):
        got = from_parent.TransformPoint([-p[0], -p[1], p[2]])
        e = itk.TransformPoint(tuple(p))
        np.testing.assert_allclose(got, [-e[0], -e[1], e[2]], atol=1e-3)


def test_existing_outputs_are_not_overwritten(registered, tmp_path):
    result, paths, _, pair = registered
    (tmp_path / "report.json").write_text("user data")
    with pytest.raises(OutputError, match="already holds report.json"):
        write_outputs(result, tmp_path, pair.moving)
    assert (tmp_path / "report.json").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
