"""Partial fields of view: a scan cropped to a box registers to a longer one, and alternatives are
tried before a refusal and named in the result (unrelated anatomy: test_bad_input.py)."""

import numpy as np
import pytest
import SimpleITK as sitk
from _stage_pairs import GRID, mind_maps, shifted, textured_body

from SAMERegistrationLib import register
from SAMERegistrationLib.errors import RegistrationFailed
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.initial_pose import axis_rotation
from SAMERegistrationLib.stages.fallback import feature_agreement, overlap_share
from SAMERegistrationLib.working import WorkingImage

AFFINE_ONLY = {"coarse__enabled": False, "deform__enabled": False, "instance__enabled": False}


def box_body(size_zyx, box: tuple[slice, slice, slice], grid_origin=(0.0, 0.0, 0.0)):
    body = np.zeros(size_zyx, dtype=bool)
    body[box] = True
    grid = Grid(size_zyx, (2.0, 2.0, 2.0), grid_origin)
    return WorkingImage(np.where(body, 40.0, -1000.0).astype(np.float32), body, grid)


def test_overlap_is_measured_over_the_smaller_body() -> None:
    large = box_body((40, 40, 40), (slice(0, 40),) * 3)  # 80 mm cube
    small = box_body((40, 40, 40), (slice(10, 20),) * 3)  # a 20 mm cube inside it
    assert overlap_share(large, small, np.eye(4)) == pytest.approx(1.0)
    assert overlap_share(small, large, np.eye(4)) == pytest.approx(1.0)
    part = np.eye(4)
    part[0, 3] = 12.0  # 6 of the small cube's 10 voxels along x land off the other cube
    assert overlap_share(small, small, part) == pytest.approx(0.4)
    away = np.eye(4)
    away[2, 3] = 200.0
    assert overlap_share(small, large, away) == 0.0


def test_features_agree_where_the_anatomy_is_the_same() -> None:
    image = textured_body()
    moved = shifted(image, (6.0, -4.0, 8.0))
    fixed, moving = mind_maps(image, moved)
    truth = np.eye(4)
    truth[:3, 3] = (6.0, -4.0, 8.0)
    off = truth.copy()
    off[:3, 3] += (0.0, 0.0, 0.25 * GRID.shape[0] * 2.0)
    at_truth = feature_agreement(fixed, moving, truth)
    assert at_truth > 0.95
    assert feature_agreement(fixed, moving, off) < at_truth - 0.2


def openkbp_case(openkbp, number: str) -> dict:
    return {
        "image": openkbp / f"validation_pt_{number}_ct.nii.gz",
        "labels": openkbp / f"validation_pt_{number}_label.nii.gz",
    }


def register_pair(openkbp, fixed: str, moving: str, **overrides):
    f, m = openkbp_case(openkbp, fixed), openkbp_case(openkbp, moving)
    return register(
        f["image"], m["image"], fixed_labels=f["labels"], moving_labels=m["labels"],
        features="mind", **AFFINE_ONLY, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cropped_pair(openkbp) -> tuple[sitk.Image, sitk.Image, np.ndarray, np.ndarray]:
    """Fixed: a head & neck CT with everything outside a box around the head set to air (as in
    masked OpenKBP scans); moving: the whole scan, reaching into the chest, placed by a known rigid
    transform (its geometry changed, no resampling). Also: fixed body points and their images."""
    image = sitk.ReadImage(str(openkbp / "validation_pt_236_ct.nii.gz"))
    array = sitk.GetArrayFromImage(image)
    cropped = np.full_like(array, -1024)
    box = (slice(50, 105), slice(35, 95), slice(40, 90))  # z, y, x: skull base to larynx
    cropped[box] = array[box]
    fixed = sitk.GetImageFromArray(cropped)
    fixed.CopyInformation(image)
    rotation = axis_rotation(2, 6.0)  # about the body axis
    translation = np.array([25.0, -15.0, 40.0])
    moving = sitk.Image(image)
    direction = rotation @ np.array(image.GetDirection()).reshape(3, 3)
    moving.SetDirection(tuple(direction.ravel()))
    moving.SetOrigin(tuple(rotation @ np.array(image.GetOrigin()) + translation))
    zyx = np.argwhere(cropped[box] > -500)[::50] + [b.start for b in box]
    points = np.array([fixed.TransformIndexToPhysicalPoint(p[::-1].tolist()) for p in zyx])
    return fixed, moving, points, points @ rotation.T + translation


def test_cropped_scan_registers_to_the_full_one_with_a_known_transform(
    cropped_pair, one_thread
) -> None:
    """The scanner coordinates are 40 mm and more off; the search finds the known transform."""
    fixed, moving, points, expected = cropped_pair
    result = register(fixed, moving, features="mind", **AFFINE_ONLY)
    affine = result.affine
    error = np.linalg.norm(points @ affine[:3, :3].T + affine[:3, 3] - expected, axis=1)
    assert np.mean(error) < 3.0 and np.percentile(error, 95) < 6.0, (
        np.mean(error),
        result.stages.get("fallback"),
    )


def test_scans_registered_as_placed_keep_their_start(openkbp, cropped_pair, one_thread) -> None:
    """initialisation=identity: the placement is the start. Placed right (the uncropped scan where
    it was), the identity is recovered by the first path; placed 40 mm and more off (too few
    matches there, even in the wider window), no other start replaces it: refused, saying what to
    do."""
    fixed, moving, points, _ = cropped_pair
    placed = sitk.ReadImage(str(openkbp / "validation_pt_236_ct.nii.gz"))
    result = register(fixed, placed, features="mind", initialisation="identity", **AFFINE_ONLY)
    assert "fallback" not in result.stages
    affine = result.affine
    error = np.linalg.norm(points @ affine[:3, :3].T + affine[:3, 3] - points, axis=1)
    assert np.mean(error) < 3.0, np.mean(error)
    with pytest.raises(RegistrationFailed) as refused:
        register(fixed, moving, features="mind", initialisation="identity", **AFFINE_ONLY)
    message = str(refused.value)
    assert "reliable match" in message and "twice as wide" in message
    assert "registered as placed (initialisation=identity)" in message
    assert "use initialisation=search" in message


def test_masked_fixed_scan_registers_by_a_named_fallback(openkbp, one_thread) -> None:
    """validation 203 is masked to a box around the head; 236 reaches into the chest. The first
    translation search puts the box on a shoulder (too few matches); a fallback path finds it."""
    result = register_pair(openkbp, "203", "236")
    fallback = result.stages["fallback"]
    assert result.stages["affine"]["fallback"] == fallback["path"]
    assert "reliable match" in fallback["reason"]
    assert len(fallback["tried"]) >= 2
    assert any(fallback["path"] in warning for warning in result.warnings)
    assert result.metrics["mean_dice_after"] > 0.35, result.metrics


def test_masked_moving_scan_is_not_refused_for_its_small_body(openkbp, one_thread) -> None:
    """validation 213 is masked to a box: its body covers a fifth of 238's, all of it shared."""
    result = register_pair(openkbp, "238", "213")
    assert "fallback" not in result.stages
    assert result.stages["affine"]["overlap_share"] > 0.8  # of 213's body, under the affine
    assert result.metrics["mean_dice_after"] > 0.45, result.metrics
