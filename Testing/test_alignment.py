"""Alignment: the map p -> A(p + u(p)) composes, maps points and pulls volumes as written down."""

import numpy as np
import pytest
import torch

from SAMERegistrationLib import spatial
from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.grid import Grid, slabs

GRID = Grid((12, 10, 14), (2.0, 2.5, 3.0), (-10.0, 20.0, 5.0))
AFFINE = np.array(
    [[1.05, 0.02, 0.0, 4.0], [-0.03, 0.97, 0.01, -3.0], [0.0, 0.04, 1.02, 7.5], [0, 0, 0, 1]]
)


def linear_field(grid: Grid, matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """u(p) = M p + c on the grid: trilinear sampling reproduces it exactly inside the grid."""
    points = spatial.voxel_points(grid).double()
    values = points @ torch.as_tensor(matrix).T + torch.as_tensor(offset)
    return values.permute(0, 4, 1, 2, 3).float()


U_MATRIX = np.array([[0.02, 0.0, 0.01], [0.0, -0.03, 0.0], [0.01, 0.0, 0.02]])
U_OFFSET = np.array([1.0, -2.0, 0.5])


def inner_points(count: int = 50, seed: int = 0) -> np.ndarray:
    """Points well inside GRID, where p + u(p) stays inside too."""
    rng = np.random.default_rng(seed)
    idx = rng.uniform(2, np.array(GRID.size_xyz) - 3, size=(count, 3))
    return GRID.index_to_physical(idx)


def test_map_points_is_the_affine_after_the_field() -> None:
    alignment = Alignment(AFFINE, linear_field(GRID, U_MATRIX, U_OFFSET), GRID)
    p = inner_points()
    moved = p + p @ U_MATRIX.T + U_OFFSET
    expected = moved @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    np.testing.assert_allclose(alignment.map_points(p), expected, atol=1e-4)


def test_compose_applies_the_inner_displacement_first() -> None:
    alignment = Alignment(AFFINE, linear_field(GRID, U_MATRIX, U_OFFSET), GRID)
    shift = np.array([1.5, 0.0, -1.0])
    inner = (
        torch.as_tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *GRID.shape)
    )
    composed = alignment.compose(inner.contiguous())
    p = inner_points(seed=1)
    np.testing.assert_allclose(composed.map_points(p), alignment.map_points(p + shift), atol=1e-4)


def test_pull_samples_a_moving_volume_through_the_map() -> None:
    # A moving volume that is linear in its coordinates: its pulled values are known exactly.
    moving_grid = Grid((45, 45, 45), (2.0, 2.0, 2.0), (-40.0, -30.0, -30.0))
    weights = np.array([0.3, -0.2, 0.5])
    points = spatial.voxel_points(moving_grid).double()
    volume = (points @ torch.as_tensor(weights))[:, None].float()
    alignment = Alignment(AFFINE, linear_field(GRID, U_MATRIX, U_OFFSET), GRID)
    pulled = alignment.pull(volume, moving_grid)[0, 0].numpy()
    fixed_points = GRID.voxel_centres().reshape(-1, 3)
    expected = (alignment.map_points(fixed_points) @ weights).reshape(GRID.shape)
    np.testing.assert_allclose(pulled, expected, atol=1e-3)


def test_deformable_part_and_affine_reproduce_the_whole_map() -> None:
    # An image grid larger than the working grid and oblique: u keeps its border value outside.
    theta = np.deg2rad(20)
    direction = np.array(
        [[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]]
    )
    image_grid = Grid((9, 11, 13), (3.5, 3.0, 4.0), (-20.0, 10.0, 0.0), direction)
    alignment = Alignment(AFFINE, linear_field(GRID, U_MATRIX, U_OFFSET), GRID)
    whole = alignment.displacement_on(image_grid)
    u = alignment.displacement_on(image_grid, deformable_only=True)
    p = image_grid.voxel_centres()
    rebuilt = (p + u) @ AFFINE[:3, :3].T + AFFINE[:3, 3] - p
    np.testing.assert_allclose(rebuilt, whole, atol=1e-9)
    np.testing.assert_allclose(
        whole.reshape(-1, 3), alignment.map_points(p.reshape(-1, 3)) - p.reshape(-1, 3)
    )


def test_slabs_visit_every_voxel_once_in_array_order() -> None:
    pieces = list(slabs(GRID, voxels=GRID.shape[1] * GRID.shape[2] * 5))
    assert [(a, b) for a, b, _ in pieces] == [(0, 5), (5, 10), (10, 12)]
    points = np.concatenate([p for _, _, p in pieces])
    np.testing.assert_allclose(points.reshape(*GRID.shape, 3), GRID.voxel_centres())


def test_slabs_with_a_halo_add_the_neighbouring_slices_inside_the_grid() -> None:
    centres = GRID.voxel_centres()
    pieces = list(slabs(GRID, voxels=GRID.shape[1] * GRID.shape[2] * 5, halo=1))
    assert [(a, b) for a, b, _ in pieces] == [(0, 5), (5, 10), (10, 12)]
    for (_, _, points), (lo, hi) in zip(pieces, [(0, 6), (4, 11), (9, 12)]):
        np.testing.assert_allclose(points.reshape(-1, *GRID.shape[1:], 3), centres[lo:hi])


@pytest.mark.parametrize("determinant_sign", [1.0, -1.0])
def test_folding_counts_the_affine_orientation(determinant_sign) -> None:
    affine = np.diag([determinant_sign, 1.0, 1.0, 1.0])
    alignment = Alignment(affine, torch.zeros((1, 3, *GRID.shape)), GRID)
    assert alignment.folding_percent() == (0.0 if determinant_sign > 0 else 100.0)


def test_itk_transforms_agree_with_map_points() -> None:
    alignment = Alignment(AFFINE, linear_field(GRID, U_MATRIX, U_OFFSET), GRID)
    p = inner_points(5, seed=2)
    affine = alignment.affine_transform()
    whole = alignment.sitk_transform(GRID)
    for point, expected in zip(p, alignment.map_points(p)):
        np.testing.assert_allclose(whole.TransformPoint(point.tolist()), expected, atol=1e-4)
        np.testing.assert_allclose(
            affine.TransformPoint(point.tolist()), AFFINE[:3, :3] @ point + AFFINE[:3, 3], atol=1e-9
        )
