"""Voxel <-> physical conversions agree with SimpleITK, oblique directions included."""

import numpy as np
import SimpleITK as sitk
import torch

from SAMERegistrationLib import spatial
from SAMERegistrationLib.grid import Grid, axis_aligned_grid_covering


def oblique_image() -> sitk.Image:
    image = sitk.Image([7, 5, 4], sitk.sitkFloat32)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, -20.0, 5.0))
    angle = np.radians(30)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    flip = np.diag([1.0, -1.0, 1.0])
    image.SetDirection(tuple((rotation @ flip).ravel()))
    return image


def test_index_to_physical_matches_simpleitk_for_oblique_grid():
    image = oblique_image()
    grid = Grid.from_sitk(image)
    rng = np.random.default_rng(0)
    index = rng.uniform(-1, 6, size=(20, 3))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in index])
    np.testing.assert_allclose(grid.index_to_physical(index), expected, atol=1e-9)
    np.testing.assert_allclose(grid.physical_to_index(expected), index, atol=1e-9)


def test_array_order_is_zyx_and_shape_matches_simpleitk():
    image = oblique_image()
    grid = Grid.from_sitk(image)
    assert grid.shape == sitk.GetArrayViewFromImage(image).shape == (4, 5, 7)
    assert grid.size_xyz == image.GetSize()


def test_covering_grid_spans_all_corners():
    grid = Grid.from_sitk(oblique_image())
    cover = axis_aligned_grid_covering(grid.corners(), 1.0)
    assert cover.is_axis_aligned
    assert np.all(cover.contains(grid.corners(), margin_voxels=1e-6))


def test_normalised_coordinates_follow_align_corners_true():
    grid = Grid((5, 3, 9), (2.0, 1.0, 4.0), (10.0, 20.0, 30.0))
    first = torch.tensor([[10.0, 20.0, 30.0]])
    last = torch.tensor([[10.0 + 8 * 2.0, 20.0 + 2 * 1.0, 30.0 + 4 * 4.0]])
    torch.testing.assert_close(spatial.physical_to_normalized(first, grid), -torch.ones(1, 3))
    torch.testing.assert_close(spatial.physical_to_normalized(last, grid), torch.ones(1, 3))


def test_sampling_at_voxel_centres_returns_voxel_values():
    grid = Grid((4, 5, 6), (2.0, 3.0, 1.5), (-5.0, 7.0, 1.0))
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)
    zyx = np.array([[0, 0, 0], [3, 4, 5], [2, 1, 3]])
    points = torch.as_tensor(grid.index_to_physical(zyx[:, ::-1]), dtype=torch.float32)
    values = spatial.sample_points(volume, grid, points)[:, 0]
    expected = volume[0, 0, zyx[:, 0], zyx[:, 1], zyx[:, 2]]
    torch.testing.assert_close(values, expected)


def test_voxel_points_agree_with_grid():
    grid = Grid((3, 4, 5), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0))
    points = spatial.voxel_points(grid)[0].numpy()
    np.testing.assert_allclose(points, grid.voxel_centres(), atol=1e-5)
