"""Known transforms applied to real CT with SimpleITK are recovered (fixed -> moving direction)."""

import numpy as np
import pytest
import SimpleITK as sitk

from SAMERegistrationLib import register
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.synthetic import affine_about_centre, known_pair, smooth_displacement


def body_points(image: sitk.Image, count: int = 400, seed: int = 0) -> np.ndarray:
    """Physical points spread over the body (> -300 HU), away from the image border."""
    array = sitk.GetArrayFromImage(image)
    inner = np.zeros(array.shape, dtype=bool)
    inner[4:-4, 4:-4, 4:-4] = True
    zyx = np.argwhere((array > -300) & inner)
    rng = np.random.default_rng(seed)
    chosen = zyx[rng.choice(len(zyx), size=min(count, len(zyx)), replace=False)]
    return Grid.from_sitk(image).index_to_physical(chosen[:, ::-1].astype(float))


AFFINE_CASES = {
    "translation": dict(translation_mm=(12.0, -8.0, 6.0)),
    "rotation": dict(rotation_deg=(0.0, 0.0, 8.0)),
    "general": dict(rotation_deg=(3.0, -4.0, 5.0), scale=(1.06, 0.95, 1.03), shear=0.05,
                    translation_mm=(-6.0, 5.0, 4.0)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(AFFINE_CASES))
def test_affine_stage_recovers_known_affine(abdomen_ct, case):
    phi = affine_about_centre(abdomen_ct, **AFFINE_CASES[case])
    pair = known_pair(abdomen_ct, phi)
    result = register(
        pair.fixed, pair.moving, features="mind", coarse__enabled=False, instance__enabled=False
    )
    points = body_points(pair.fixed)
    truth = pair.true_map(points)
    error = np.linalg.norm(result.map_points(points) - truth, axis=1)
    moved = np.linalg.norm(truth - points, axis=1)
    assert moved.mean() > 5.0  # the transform is not trivial
    # Matches live on the 4 mm feature grid: half of that is the accuracy to expect.
    assert error.mean() < 2.0, f"{case}: mean error {error.mean():.2f} mm"
    # The affine alone (as exported) is the whole map when the deformable stages are off.
    expected_matrix = np.eye(4)
    expected_matrix[:3, :3] = np.array(phi.GetMatrix()).reshape(3, 3)
    expected_matrix[:3, 3] = np.array(phi.TransformPoint((0.0, 0.0, 0.0)))
    np.testing.assert_allclose(result.affine[:3, :3], expected_matrix[:3, :3], atol=0.03)


def test_smooth_deformation_of_real_ct_is_recovered(abdomen_ct):
    grid = Grid.from_sitk(abdomen_ct)
    warp = smooth_displacement(grid, magnitude_mm=9.0, seed=3, smoothness_mm=60.0)
    pair = known_pair(abdomen_ct, warp)
    result = register(pair.fixed, pair.moving, features="mind")
    points = body_points(pair.fixed, seed=1)
    truth = pair.true_map(points)
    moved = np.linalg.norm(truth - points, axis=1)
    error = np.linalg.norm(result.map_points(points) - truth, axis=1)
    affine_only = register(
        pair.fixed, pair.moving, features="mind", coarse__enabled=False, instance__enabled=False
    )
    affine_error = np.linalg.norm(affine_only.map_points(points) - truth, axis=1)
    assert moved.mean() > 3.0
    # The deformable stages must do the work: the affine alone cannot follow a random warp.
    assert affine_error.mean() > 0.8 * moved.mean()
    assert error.mean() < 0.6 * moved.mean(), f"error {error.mean():.2f} of {moved.mean():.2f} mm"
    assert error.mean() < 0.25 * 9.0
    assert result.metrics["folding_percent"] < 1.0
