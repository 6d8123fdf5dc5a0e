"""Dense-field operations with known answers: composition, Jacobians, folding, SVF integration."""

import numpy as np
import torch

from SAMERegistrationLib import spatial
from SAMERegistrationLib.grid import Grid

GRID = Grid((20, 22, 24), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))


def constant_field(vector) -> torch.Tensor:
    return torch.tensor(vector, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *GRID.shape)


def linear_field(matrix: np.ndarray) -> torch.Tensor:
    """u(p) = (M - I) p, so p + u(p) = M p."""
    points = spatial.voxel_points(GRID)[0]
    m = torch.as_tensor(matrix - np.eye(3), dtype=torch.float32)
    return (points @ m.T).permute(3, 0, 1, 2)[None].contiguous()


def test_composing_translations_adds_them():
    total = spatial.compose(constant_field([1.0, -2.0, 0.5]), constant_field([3.0, 0.0, 1.0]), GRID)
    torch.testing.assert_close(total, constant_field([4.0, -2.0, 1.5]))


def test_compose_applies_inner_first():
    # outer is a scaling about the origin, inner a translation: (S o T)(p) = S(p + t).
    scale = np.diag([1.1, 1.0, 1.0])
    outer = linear_field(scale)
    inner = constant_field([2.0, 0.0, 0.0])
    total = spatial.compose(outer, inner, GRID)
    points = spatial.voxel_points(GRID)[0]
    expected = (points + torch.tensor([2.0, 0, 0])) @ torch.as_tensor(scale, dtype=torch.float32).T
    centre = (slice(2, -2),) * 3  # away from the border, where sampling is clamped
    got = (points + total[0].permute(1, 2, 3, 0))[centre]
    torch.testing.assert_close(got, expected[centre], atol=1e-4, rtol=1e-5)


def test_jacobian_of_linear_map_is_its_determinant():
    matrix = np.array([[1.1, 0.2, -0.1], [0.15, 0.9, 0.1], [0.05, -0.2, 1.2]])
    det = spatial.jacobian_determinant(linear_field(matrix), GRID)
    np.testing.assert_allclose(det.numpy(), np.linalg.det(matrix), rtol=1e-4)


def test_folding_percent_counts_the_folded_region():
    # A reflection in x on the lower half of the slab folds exactly that half.
    field = torch.zeros(1, 3, *GRID.shape)
    points = spatial.voxel_points(GRID)[0]
    folded = torch.zeros(GRID.shape, dtype=torch.bool)
    folded[: GRID.shape[0] // 2] = True
    field[0, 0][folded] = -2 * points[..., 0][folded] + 100.0
    mask = np.zeros(GRID.shape, dtype=bool)
    mask[2:8] = True  # well inside the folded half, away from the seam
    assert spatial.folding_percent(field, GRID, mask) == 100.0
    mask[:] = False
    mask[12:18] = True
    assert spatial.folding_percent(field, GRID, mask) == 0.0


def smooth_velocity(seed: int, amplitude: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, 5, 6, 6, generator=generator)
    field = torch.nn.functional.interpolate(
        noise, size=GRID.shape, mode="trilinear", align_corners=True
    )
    return field * amplitude / field.abs().max()


def test_scaling_and_squaring_of_v_and_minus_v_compose_to_identity():
    velocity = smooth_velocity(0, amplitude=4.0)
    forward = spatial.integrate_velocity(velocity, GRID, steps=7)
    backward = spatial.integrate_velocity(-velocity, GRID, steps=7)
    roundtrip = spatial.compose(forward, backward, GRID)
    inner = (slice(3, -3),) * 3
    assert forward.abs().max() > 2.0  # a real deformation, not a no-op
    error = roundtrip[0][(slice(None), *inner)].norm(dim=0)
    assert error.max() < 0.1 * 4.0 and error.mean() < 0.02 * 4.0


def test_small_smooth_velocity_gives_positive_jacobian():
    disp = spatial.integrate_velocity(smooth_velocity(1, amplitude=3.0), GRID)
    assert spatial.jacobian_determinant(disp, GRID).min() > 0


def cube_mean_smooth(field: torch.Tensor, passes: int, kernel: int) -> torch.Tensor:
    """The smoother's definition: the mean over each kernel^3 cube, the border voxel repeated."""
    pad = kernel // 2
    for _ in range(passes):
        padded = torch.nn.functional.pad(field, (pad,) * 6, mode="replicate")
        field = torch.nn.functional.avg_pool3d(padded, kernel, stride=1)
    return field


def test_smooth_is_the_cube_mean_with_repeated_borders_on_real_ct(abdomen_ct, one_thread) -> None:
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(abdomen_ct)[30:50, 20:60, 10:70].astype(np.float32)
    field = torch.as_tensor(hu / 1000.0)[None, None].repeat(1, 3, 1, 1, 1).requires_grad_(True)
    reference = field.detach().clone().requires_grad_(True)
    weights = torch.rand(field.shape, generator=torch.Generator().manual_seed(0))
    for passes, kernel in ((3, 3), (1, 5)):
        smoothed = spatial.smooth(field, passes, kernel)
        expected = cube_mean_smooth(reference, passes, kernel)
        assert torch.allclose(smoothed, expected, atol=1e-5)
        # The gradient (the instance stage optimises through the smoother) matches too.
        (grad,) = torch.autograd.grad((smoothed * weights).sum(), field)
        (expected_grad,) = torch.autograd.grad((expected * weights).sum(), reference)
        assert torch.allclose(grad, expected_grad, atol=1e-6)
    # A constant stays constant up to the border: nothing leaks in from outside the volume.
    constant = spatial.smooth(torch.full((1, 1, 5, 6, 7), 2.5), 3, 3)
    assert torch.allclose(constant, torch.full_like(constant, 2.5))


def test_sample_split_over_threads_equals_one_batch_item(abdomen_ct, one_thread) -> None:
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(abdomen_ct)[20:60, 20:70, 10:80].astype(np.float32)
    grid = Grid(hu.shape, (1.5, 1.0, 2.0), (-10.0, 5.0, 3.0))
    volume = torch.as_tensor(hu / 1000.0)[None, None].repeat(1, 2, 1, 1, 1)
    # A point count that no thread count divides, some points outside the grid (border values).
    generator = torch.Generator().manual_seed(1)
    corners = torch.as_tensor(grid.corners(), dtype=torch.float32)
    low, high = corners.min(0).values - 5, corners.max(0).values + 5
    points = low + (high - low) * torch.rand(1, 70_001, 3, generator=generator)
    assert points.shape[1] >= spatial.SPLIT_SAMPLE_POINTS
    results = {}
    for threads in (1, 3):
        torch.set_num_threads(threads)
        moved = points.clone().requires_grad_(True)
        values = spatial.sample(volume, grid, moved)
        (grad,) = torch.autograd.grad(values.square().sum(), moved)
        results[threads] = values.detach(), grad
    assert results[1][0].shape == (1, 2, 70_001)
    assert torch.equal(results[3][0], results[1][0])
    assert torch.equal(results[3][1], results[1][1])
    # And the value at a voxel centre is that voxel's.
    centre = torch.as_tensor(grid.index_to_physical([[7, 9, 4]]), dtype=torch.float32)[None]
    assert torch.isclose(spatial.sample(volume, grid, centre)[0, 0, 0], volume[0, 0, 4, 9, 7])


def test_shrinking_box_mean_is_avg_pool_without_padding_on_real_ct(abdomen_ct, one_thread) -> None:
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(abdomen_ct)[30:45, 20:60, 10:70].astype(np.float32)
    volume = torch.as_tensor(hu / 1000.0)[None, None]
    for kernel in (3, 9):
        expected = torch.nn.functional.avg_pool3d(
            volume, kernel, stride=1, padding=kernel // 2, count_include_pad=False
        )
        torch.testing.assert_close(spatial.box_mean(volume, kernel, "shrink"), expected)
    # Replicated borders differ from shrunk ones at the border only.
    replicate = spatial.box_mean(volume, 3)
    assert not torch.allclose(replicate, spatial.box_mean(volume, 3, "shrink"))
    inner = (..., slice(1, -1), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(replicate[inner], spatial.box_mean(volume, 3, "shrink")[inner])


def test_box_mean_gradient_is_that_of_the_mean_it_computes() -> None:
    # The adjoint written by hand, against finite differences in float64: borders on every
    # axis, and axes shorter than the window.
    generator = torch.Generator().manual_seed(3)
    for shape in ((1, 2, 5, 4, 6), (1, 1, 1, 2, 9)):
        field = torch.rand(shape, dtype=torch.float64, generator=generator, requires_grad=True)
        for kernel, border in ((3, "replicate"), (5, "replicate"), (3, "shrink"), (5, "shrink")):
            assert torch.autograd.gradcheck(spatial.box_mean, (field, kernel, border))


def bump_field(peak_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """u_x = peak * gaussian (sigma 3 voxels) at the centre: folds where its slope passes -1."""
    z, y, x = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float32) for n in GRID.shape), indexing="ij"
    )
    centre = [n / 2 for n in GRID.shape]
    bump = torch.exp(-((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) / 18)
    field = torch.zeros(1, 3, *GRID.shape)
    field[0, 0] = peak_mm * bump
    return field, bump


def test_unfold_removes_a_fold_and_leaves_the_rest_of_the_field_exactly():
    # Slope of peak * exp(-r^2 / 18) along x (2 mm voxels) is at most peak / (2 * 3) * 0.61.
    field, bump = bump_field(peak_mm=15.0)
    assert spatial.folding_percent(field, GRID) > 0.1
    unfolded, passes = spatial.unfold(field, GRID, passes=50)
    assert 0 < passes < 50
    assert spatial.folding_percent(unfolded, GRID) == 0.0
    far = bump < 1e-3  # beyond the fold region's margin
    assert torch.equal(unfolded[0][:, far], field[0][:, far])
    # A local repair: the bump keeps most of its height.
    assert unfolded[0, 0].max() > 0.7 * 15.0


def test_one_unfold_pass_changes_exactly_the_cube_around_each_folded_voxel():
    field, _ = bump_field(peak_mm=15.0)
    folded = (spatial.jacobian_determinant(field, GRID) <= 0).numpy()
    once, _ = spatial.unfold(field, GRID, passes=1, margin=2)
    changed = (once != field)[0].any(dim=0).numpy()
    # Brute force: every voxel within 2 voxels (Chebyshev) of a folded one.
    padded = np.pad(folded, 2)
    near = np.zeros_like(folded)
    for dz, dy, dx in np.ndindex(5, 5, 5):
        near |= padded[
            dz : dz + folded.shape[0], dy : dy + folded.shape[1], dx : dx + folded.shape[2]
        ]
    assert folded.any() and near.sum() > folded.sum()
    np.testing.assert_array_equal(changed, near)


def test_unfold_leaves_a_field_without_folds_alone():
    field, _ = bump_field(peak_mm=4.0)  # slope at most 0.4: no fold
    unfolded, passes = spatial.unfold(field, GRID, passes=50)
    assert passes == 0
    assert torch.equal(unfolded, field)


def test_unfold_respects_an_orientation_flipping_affine():
    # With sign -1 (an affine that mirrors), the identity field is the folded one everywhere and
    # smoothing cannot help: every pass is used and the field is only smoothed.
    field = torch.zeros(1, 3, *GRID.shape)
    assert spatial.folding_percent(field, GRID, sign=-1.0) == 100.0
    _, passes = spatial.unfold(field, GRID, passes=3, sign=-1.0)
    assert passes == 3
