"""The initial pose from coarse HU: large rotations, partial fields of view, no change when aligned.

Known answers come from real CT moved by known rigid maps, either by rewriting the geometry
(direction cosines and origin) or by resampling the voxels into a rotated, shifted grid.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SAMERegistrationLib.config import InitialPoseConfig, RegistrationConfig
from SAMERegistrationLib.errors import ConfigError, RegistrationFailed
from SAMERegistrationLib.initial_pose import (
    apply,
    axis_rotation,
    axis_rotations,
    find_initial_pose,
    reorient,
    rotation_angle_deg,
)
from SAMERegistrationLib.pipeline import register

SHIFT = np.array([30.0, -20.0, 50.0])


pytestmark = pytest.mark.usefixtures("one_thread")


def rigid(axis: int, degrees: float, shift=SHIFT) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = axis_rotation(axis, degrees)
    matrix[:3, 3] = shift
    return matrix


def moved_by_geometry(image: sitk.Image, truth: np.ndarray) -> sitk.Image:
    """The same voxels, with geometry such that fixed point p shows up at ``truth @ p``."""
    return reorient(image, np.linalg.inv(truth))


def moved_by_resampling(image: sitk.Image, truth: np.ndarray, spacing: float) -> sitk.Image:
    """The voxels resampled onto an axis-aligned grid around the moved body (``truth @ p``)."""
    size = np.array(image.GetSize())
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint((np.array(c) * (size - 1.0)).tolist())
            for c in np.ndindex(2, 2, 2)
        ]
    )
    moved = apply(truth, corners)
    low, high = moved.min(axis=0), moved.max(axis=0)
    reference = sitk.Image([int(n) for n in np.ceil((high - low) / spacing) + 1], sitk.sitkUInt8)
    reference.SetSpacing((spacing,) * 3)
    reference.SetOrigin(tuple(low))
    inverse = np.linalg.inv(truth)  # Resample pulls: output (moved) point -> input point
    transform = sitk.AffineTransform(inverse[:3, :3].ravel().tolist(), inverse[:3, 3].tolist())
    return sitk.Resample(image, reference, transform, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def body_points(image: sitk.Image, step: int = 400) -> np.ndarray:
    zyx = np.argwhere(sitk.GetArrayViewFromImage(image) > -200)[::step]
    return np.array(
        [image.TransformContinuousIndexToPhysicalPoint(p[::-1].astype(float).tolist()) for p in zyx]
    )


def found_pose(pose) -> np.ndarray:
    assert pose.prior is not None, pose.info
    return pose.reorientation @ pose.prior


def test_the_24_axis_rotations_are_distinct_proper_rotations():
    rotations = axis_rotations()
    assert len(rotations) == 24
    assert len({tuple(r.ravel()) for r in rotations}) == 24
    for r in rotations:
        np.testing.assert_allclose(r @ r.T, np.eye(3))
        assert np.linalg.det(r) == pytest.approx(1.0)


def test_axis_rotation_and_angle_known_answers():
    # A quarter turn about z sends x to y (right-handed), and its angle is 90 degrees.
    np.testing.assert_allclose(axis_rotation(2, 90.0) @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-12)
    assert rotation_angle_deg(axis_rotation(0, -37.0)) == pytest.approx(37.0)


def test_reorient_changes_geometry_only_and_moves_points_as_stated():
    image = sitk.Image([5, 6, 7], sitk.sitkFloat32)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, -4.0, 7.0))
    image.SetDirection(tuple(axis_rotation(1, 20.0).ravel()))
    image[1, 2, 3] = 42.0
    pose = rigid(0, 110.0)
    out = reorient(image, pose)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image))
    for index in ([0, 0, 0], [4, 5, 6], [1, 2, 3]):
        new = np.array(out.TransformIndexToPhysicalPoint(index))
        old = np.array(image.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose(apply(pose, new[None])[0], old, atol=1e-9)


def test_initial_pose_settings_are_validated():
    with pytest.raises(ConfigError, match="initial_pose.spacing_mm"):
        RegistrationConfig().with_overrides({"initial_pose.spacing_mm": float("nan")})
    with pytest.raises(ConfigError, match="initial_pose.angle_threshold_deg"):
        RegistrationConfig().with_overrides({"initial_pose.angle_threshold_deg": -5})


@pytest.mark.parametrize(("axis", "degrees"), [(0, 90.0), (1, -90.0), (2, 45.0), (2, 180.0)])
def test_rotated_geometry_is_recovered(abdomen_ct, axis, degrees):
    truth = rigid(axis, degrees)
    pose = find_initial_pose(abdomen_ct, moved_by_geometry(abdomen_ct, truth), InitialPoseConfig())
    found = found_pose(pose)
    assert pose.info["reoriented"]
    assert rotation_angle_deg(found[:3, :3] @ truth[:3, :3].T) < 3.0
    points = body_points(abdomen_ct)
    error = np.linalg.norm(apply(found, points) - apply(truth, points), axis=1)
    assert error.mean() < 4.0 and error.max() < 8.0, (error.mean(), error.max())
    # The re-oriented moving image shows the patient the fixed way round.
    assert rotation_angle_deg(pose.prior[:3, :3]) < 3.0


def test_a_placement_kept_as_asked_is_not_reoriented_but_warned_about(abdomen_ct):
    moving = moved_by_geometry(abdomen_ct, rigid(0, 90.0))
    pose = find_initial_pose(abdomen_ct, moving, InitialPoseConfig(), keep_placement=True)
    assert not pose.info["reoriented"] and pose.moving is moving
    np.testing.assert_array_equal(pose.reorientation, np.eye(4))
    assert pose.info["best_rotation_deg"] == pytest.approx(90.0, abs=3.0)
    assert rotation_angle_deg(pose.start[:3, :3]) == 0.0  # the fallback's pose start: unrotated
    assert any("placement was kept as asked" in w for w in pose.warnings), pose.warnings
    assert not any("not closely enough" in w for w in pose.warnings), pose.warnings


def test_resampled_rotation_of_a_head_and_neck_ct_is_recovered(openkbp):
    fixed = sitk.ReadImage(str(openkbp / "validation_pt_213_ct.nii.gz"), sitk.sitkFloat32)
    truth = rigid(0, 75.0) @ rigid(2, 30.0, shift=(0.0, 0.0, 0.0))
    moving = moved_by_resampling(fixed, truth, spacing=3.0)
    pose = find_initial_pose(fixed, moving, InitialPoseConfig())
    found = found_pose(pose)
    assert pose.info["reoriented"]
    assert rotation_angle_deg(found[:3, :3] @ truth[:3, :3].T) < 4.0
    points = body_points(fixed, step=200)
    error = np.linalg.norm(apply(found, points) - apply(truth, points), axis=1)
    assert error.mean() < 5.0 and error.max() < 10.0, (error.mean(), error.max())


def test_two_fields_of_view_of_one_ct_get_the_known_translation(openkbp):
    ct = sitk.ReadImage(str(openkbp / "validation_pt_238_ct.nii.gz"), sitk.sitkFloat32)
    fixed = ct[:, :, 64:]  # the upper half: stops above the shoulders
    moving = ct[:, :, 8:]  # reaches further down
    shift = np.array([25.0, -15.0, 60.0])
    moving.SetOrigin(tuple(np.array(moving.GetOrigin()) + shift))  # point p appears at p + shift
    pose = find_initial_pose(fixed, moving, InitialPoseConfig())
    found = found_pose(pose)
    assert not pose.info["reoriented"]
    points = body_points(fixed, step=200)
    error = np.linalg.norm(apply(found, points) - (points + shift), axis=1)
    assert error.mean() < 4.0, (error.mean(), pose.info)


def test_an_aligned_pair_is_left_alone(abdomen_ct):
    pose = find_initial_pose(abdomen_ct, abdomen_ct, InitialPoseConfig())
    assert not pose.info["reoriented"] and pose.moving is abdomen_ct
    np.testing.assert_array_equal(pose.reorientation, np.eye(4))
    assert rotation_angle_deg(pose.prior[:3, :3]) == 0.0
    assert np.linalg.norm(pose.prior[:3, 3]) < 1.0
    assert pose.warnings == []
    # A final affine far from the pose is flagged; the identity is not.
    assert pose.final_warnings(np.eye(4)) == []
    centre = body_points(abdomen_ct).mean(axis=0)
    turned = rigid(2, 90.0, shift=(0.0, 0.0, 0.0))
    turned[:3, 3] = centre - turned[:3, :3] @ centre
    warnings = pose.final_warnings(turned)
    assert any("rotated 90 degrees away" in w for w in warnings), warnings
    assert any("agree poorly" in w for w in warnings), warnings


def test_disabled_pose_changes_nothing(abdomen_ct):
    pose = find_initial_pose(abdomen_ct, abdomen_ct, InitialPoseConfig(enabled=False))
    assert pose.moving is abdomen_ct and pose.prior is None
    assert pose.info == {"status": "skipped", "reason": "disabled"}


def test_registration_of_a_rotated_copy_recovers_points(abdomen_ct):
    truth = rigid(0, 90.0)
    result = register(
        abdomen_ct,
        moved_by_geometry(abdomen_ct, truth),
        features="mind",
        device="cpu",
        deform__enabled=False,
        instance__enabled=False,
    )
    assert result.stages["initial_pose"]["reoriented"]
    assert result.warnings == []
    points = body_points(abdomen_ct, step=300)
    error = np.linalg.norm(result.map_points(points) - apply(truth, points), axis=1)
    assert error.mean() < 2.0 and error.max() < 6.0, (error.mean(), error.max())
    # The correspondences are reported in the original moving space.
    matched = np.linalg.norm(result.matches.moving - apply(truth, result.matches.fixed), axis=1)
    assert np.median(matched) < 4.0


def test_registration_as_placed_does_not_reorient_the_moving_scan(abdomen_ct):
    """initialisation=identity on a copy turned 90 degrees and moved: the placement stays the
    start (re-oriented, it would register); there the bodies do not meet: refused, saying so."""
    with pytest.raises(RegistrationFailed) as refused:
        register(
            abdomen_ct,
            moved_by_geometry(abdomen_ct, rigid(0, 90.0)),
            features="mind",
            device="cpu",
            initialisation="identity",
            deform__enabled=False,
            instance__enabled=False,
        )
    message = str(refused.value)
    assert "no part of the moving body lies on the fixed body" in message
    assert "registered as placed (initialisation=identity)" in message
