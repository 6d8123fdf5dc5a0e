"""Conversions between the library (SimpleITK, LPS) and real MRML nodes (slicer-core, RAS).

Known answers: oblique geometry round trips, a constant field, a synthetic result with a strong
affine and dense part whose map the nodes must reproduce, the worker's deformable file, the QA
volumes, and the feature maps the match search reads without PyTorch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip(
    "slicer", reason="needs the slicer-core wheel (pip install slicer-core)"
)

from slicer_scene import headless_scene  # noqa: E402

from SAMERegistrationLib import mrml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scene():
    return headless_scene()


def add_volume(scene, image, name, cls="vtkMRMLScalarVolumeNode"):
    return mrml.update_volume_node_from_image(scene.AddNewNodeByClass(cls, name), image)


def random_fixed_points(grid, count=400, seed=3):
    rng = np.random.default_rng(seed)
    return grid.index_to_physical(rng.uniform(0, 1, (count, 3)) * (np.array(grid.size_xyz) - 1))


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
    node.SetAndObserveTransformFromParent(mrml.grid_transform_from_array(field, grid))
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


def transform_parts_from_files(affine_path, deformable_path):
    """Affine (LPS), dense part (z, y, x, 3; LPS mm) and its grid from the library's output
    files: affine.tfm and deformable.* (the deformable part alone on the fixed grid)."""
    from SAMERegistrationLib.grid import Grid

    if str(deformable_path).endswith(".h5"):
        transform = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(deformable_path)))
        image = transform.GetDisplacementField()
    else:
        image = sitk.ReadImage(str(deformable_path))
    dense = sitk.GetArrayFromImage(image).astype(np.float32)
    return mrml.read_affine(affine_path), dense, Grid.from_sitk(image)


def test_nodes_from_a_result_map_points_as_the_library(scene):
    """Linear under grid: p -> A (p + u(p)). The other nesting, p -> A p + u(A p), is far off."""
    result = synthetic_result()
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    dense = mrml.grid_transform_from_array(np.moveaxis(result.dense, 0, -1), result.working_grid)
    mrml.set_registration(linear, result.affine, grid, dense)
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
    affine, dense, grid = transform_parts_from_files(paths["affine"], paths["deformable"])
    np.testing.assert_allclose(affine, result.affine, atol=1e-9)
    assert grid.matches(result.fixed_grid)  # the dense part on the fixed grid, oblique
    assert dense.dtype == np.float32
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    grid_node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    # As the module loads it: Slicer's own reader, no per-voxel work in Python.
    mrml.set_registration(linear, affine, grid_node, mrml.read_deformable(paths["deformable"]))
    centres = result.fixed_grid.voxel_centres().reshape(-1, 3)[::7]
    np.testing.assert_allclose(
        mrml.map_points_through(linear, centres @ mrml.FLIP) @ mrml.FLIP,
        result.map_points(centres),
        atol=1e-3,
    )
    for node in (linear, grid_node):
        scene.RemoveNode(node)


def test_deformable_file_with_the_affine_is_the_whole_map(tmp_path):
    """deformable.* holds u alone on the fixed grid: A (p + u(p)) equals the whole-map file."""
    from SAMERegistrationLib.export import write_outputs

    result = synthetic_result()
    moving = result.fixed_grid.apply_to(sitk.GetImageFromArray(np.zeros((20, 24, 28), np.float32)))
    for field_format in ("nii.gz", "h5"):
        result.config.export.field_format = field_format
        paths = write_outputs(result, tmp_path / field_format, moving)
        affine, dense, grid = transform_parts_from_files(paths["affine"], paths["deformable"])
        assert grid.matches(result.fixed_grid)
        centres = result.fixed_grid.voxel_centres().reshape(-1, 3)
        mapped = (centres + dense.reshape(-1, 3)) @ affine[:3, :3].T + affine[:3, 3]
        np.testing.assert_allclose(mapped, result.map_points(centres), atol=1e-3)
        if field_format == "nii.gz":
            whole = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["transform"])))
            np.testing.assert_allclose(mapped - centres, whole.reshape(-1, 3), atol=1e-3)


def test_dense_part_is_never_recovered_from_the_whole_map():
    """The per-voxel inversion of the affine (dense_from_total) is gone from the library."""
    assert not hasattr(mrml, "dense_from_total")
    for path in (REPO / "SAMERegistration").rglob("*.py"):
        assert "dense_from_total" not in path.read_text(), path


def test_qa_volumes_in_slabs_equal_the_whole_computation(scene, monkeypatch):
    """Magnitude and Jacobian of a known map; computing in slabs changes nothing."""
    result = synthetic_result()
    reference = add_volume(
        scene,
        result.fixed_grid.apply_to(sitk.GetImageFromArray(np.zeros((20, 24, 28), np.int16))),
        "qa reference",
    )
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    dense = mrml.grid_transform_from_array(np.moveaxis(result.dense, 0, -1), result.working_grid)
    mrml.set_registration(linear, result.affine, grid, dense)
    whole = {k: sitk.GetArrayFromImage(mrml.displacement_qa_image(linear, reference, k))
             for k in ("magnitude", "jacobian")}  # fmt: skip
    centres = result.fixed_grid.voxel_centres().reshape(-1, 3)
    expected = np.linalg.norm(result.map_points(centres) - centres, axis=1)
    np.testing.assert_allclose(whole["magnitude"].ravel(), expected, atol=2e-3)
    assert whole["jacobian"].dtype == np.float32
    monkeypatch.setattr(mrml, "SLAB_VOXELS", 24 * 28 * 3)  # 3 slices a slab, 7 slabs
    for kind in ("magnitude", "jacobian"):
        sliced = sitk.GetArrayFromImage(mrml.displacement_qa_image(linear, reference, kind))
        np.testing.assert_allclose(sliced, whole[kind], rtol=1e-5, atol=1e-5)

    # The Jacobian of a pure affine map is its determinant everywhere.
    mrml.set_registration(linear, np.diag([1.1, 0.9, 1.05, 1.0]))
    jacobian = mrml.displacement_qa_image(linear, reference, "jacobian")
    np.testing.assert_allclose(sitk.GetArrayFromImage(jacobian), 1.1 * 0.9 * 1.05, rtol=1e-5)
    voxels, seconds, megabytes = mrml.qa_cost(reference)
    assert voxels == 20 * 24 * 28 and seconds > 0 and megabytes > voxels * 4 / 1e6
    for node in (linear, grid, reference):
        scene.RemoveNode(node)


def test_feature_maps_round_trip_and_match_without_torch(tmp_path):
    """The worker's descriptors (float16, body voxels) find a known match with numpy alone."""
    import torch

    from SAMERegistrationLib.feature_export import write_feature_maps
    from SAMERegistrationLib.features.base import FeatureMaps
    from SAMERegistrationLib.grid import Grid

    rng = np.random.default_rng(4)
    fixed_grid = Grid((10, 9, 8), (4.0, 4.0, 4.0), (-20.0, -18.0, -16.0), np.eye(3))
    moving_grid = Grid((10, 9, 8), (4.0, 4.0, 4.0), (0.0, 2.0, 4.0), np.eye(3))
    local = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(1, 6, 8, 9, 10))), dim=1)
    body = np.ones((8, 9, 10), bool)
    body[0] = False
    fixed = FeatureMaps(local.float(), local.float(), fixed_grid, body)
    moving = FeatureMaps(local.float(), local.float(), moving_grid, body)  # same voxels, shifted
    result = type("Result", (), {"fixed_features": fixed, "moving_features": moving,
                                 "features": "sam"})()  # fmt: skip
    path = tmp_path / "feature_maps.npz"
    write_feature_maps(result, path)
    code = f"""
import sys
sys.modules["torch"] = None  # no PyTorch here, as in Slicer's process
import numpy as np
from SAMERegistrationLib.feature_export import match_point, read_feature_maps
fixed, moving, kind = read_feature_maps({str(path)!r})
assert kind == "sam" and fixed.descriptors.dtype == np.float16, kind
for xyz in [(3, 4, 5), (9, 8, 7), (0, 0, 1)]:
    point = np.array(xyz) * 4.0 + (0.0, 2.0, 4.0)
    found, similarity = match_point(fixed, moving, point)
    assert np.allclose(found, np.array(xyz) * 4.0 + (-20.0, -18.0, -16.0)), (xyz, found)
    assert similarity > 0.99, similarity
assert match_point(fixed, moving, np.array([0.0, 2.0, 4.0])) is None  # outside the body
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


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
