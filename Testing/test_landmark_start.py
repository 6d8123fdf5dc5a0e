"""benchmarks/landmark_start.py: the rigid pose fitted to organ landmarks, on real label maps."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import landmark_start  # noqa: E402

from SAMERegistrationLib.initial_pose import axis_rotation, reorient  # noqa: E402


@pytest.fixture(scope="module")
def labels_236(openkbp) -> sitk.Image:
    return sitk.ReadImage(str(openkbp / "validation_pt_236_label.nii.gz"))


def test_landmarks_are_the_parotids_and_three_cord_points_below_the_brainstem(labels_236):
    found = landmark_start.landmarks(labels_236)
    assert sorted(found) == [
        "cord 0 mm down",
        "cord 40 mm down",
        "cord 70 mm down",
        "parotid 3",
        "parotid 4",
    ]
    array = sitk.GetArrayFromImage(labels_236)
    stem_bottom = np.flatnonzero((array == 1).any(axis=(1, 2))).min()
    bottom_z = labels_236.TransformIndexToPhysicalPoint((0, 0, int(stem_bottom)))[2]
    cord_z = [found[f"cord {d} mm down"][2] for d in (0, 40, 70)]
    # each point one slice below the brainstem, then 40 and 70 mm lower (to the nearest slice)
    spacing = labels_236.GetSpacing()[2]
    assert cord_z[0] == pytest.approx(bottom_z - spacing)
    assert np.diff(cord_z) == pytest.approx([-40.0, -30.0], abs=spacing / 2)
    # the right parotid lies at the patient's right: smaller x in LPS
    assert found["parotid 3"][0] < found["parotid 4"][0]


def test_landmark_pose_recovers_a_known_rigid_map(labels_236):
    # reorient: the moved map's point p is the original's truth @ p, so the fixed -> moving pose
    # that carries each landmark q of the original onto the moved map is inverse(truth).
    truth = np.eye(4)
    truth[:3, :3] = axis_rotation(0, 12.0) @ axis_rotation(2, -20.0)
    truth[:3, 3] = (15.0, -40.0, 65.0)
    moved = reorient(labels_236, truth)
    pose, residual, count = landmark_start.landmark_pose(labels_236, moved)
    assert count == 5
    assert residual < 1e-6
    np.testing.assert_allclose(pose, np.linalg.inv(truth), atol=1e-6)


def test_landmark_error_is_the_distance_left_at_the_landmarks(labels_236):
    # A pure translation: the moved map's landmarks lie 13 mm from the originals, so the identity
    # map leaves them 13 mm off and the map by the translation leaves them on the spot.
    truth = np.eye(4)
    truth[:3, 3] = (5.0, 12.0, 0.0)
    fixed, moving = landmark_start.shared_landmarks(labels_236, reorient(labels_236, truth))
    assert len(fixed) == 5
    assert landmark_start.landmark_error(fixed, moving, fixed) == pytest.approx(13.0)
    assert landmark_start.landmark_error(fixed, moving, fixed - truth[:3, 3]) < 1e-9


def test_landmark_pose_needs_three_shared_landmarks(labels_236):
    array = sitk.GetArrayFromImage(labels_236)
    parotids_only = sitk.GetImageFromArray(np.where(np.isin(array, (3, 4)), array, 0))
    parotids_only.CopyInformation(labels_236)
    with pytest.raises(ValueError, match="only 2 landmarks in both label maps"):
        landmark_start.landmark_pose(labels_236, parotids_only)


def test_a_malformed_pair_is_refused_with_the_expected_form(capsys):
    with pytest.raises(SystemExit):
        landmark_start.main(["236-221"])
    assert "FIXED:MOVING patient numbers, e.g. 236:221" in capsys.readouterr().err


def test_a_pair_without_enough_landmarks_is_skipped_and_recorded(tmp_path, capsys):
    import json

    for patient in (1, 2):
        labels = np.zeros((20, 20, 20), np.uint8)
        labels[5:9, 5:9, 3:7], labels[5:9, 5:9, 13:17] = 3, 4  # parotids only: 2 landmarks
        for kind, array in (("ct", labels.astype(np.int16) - 1000), ("label", labels)):
            path = tmp_path / f"validation_pt_{patient}_{kind}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert landmark_start.main(["1:2", "--data", str(tmp_path), "--output-dir", str(tmp_path)]) == 0
    assert (
        "validation_pt_1 <- validation_pt_2: skipped, only 2 landmarks" in capsys.readouterr().out
    )
    (written,) = tmp_path.glob("landmark_start-*.json")
    document = json.loads(written.read_text())
    assert document["pairs"][0]["skipped"].startswith("only 2 landmarks")
    assert "command" in document and document["machine"]["cores"] >= 1
