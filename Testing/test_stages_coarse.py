"""stages/coarse.run: a smooth displacement known at the matched points is recovered on top of
the affine; a field fitted to noisy matches of a perfect alignment is rejected by the image
similarity; too few matches leave the stage out."""

import numpy as np
import pytest
import torch
from _stage_pairs import GRID, matches_through, pulled_through, textured_body

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.matching import Matches
from SAMERegistrationLib.stages import StageContext, coarse

AFFINE = np.array(
    [[1.02, 0.0, 0.03, 5.0], [0.0, 0.98, 0.0, -3.0], [0.0, 0.02, 1.0, 2.0], [0, 0, 0, 1]]
)
LOW, HIGH = GRID.corners().min(axis=0), GRID.corners().max(axis=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_u(points: np.ndarray) -> np.ndarray:
    """A displacement of up to 4 mm that varies over the whole grid (half a period per axis)."""
    s = (points - LOW) / (HIGH - LOW)  # 0..1 across the grid
    return 4.0 * np.stack(
        [np.sin(np.pi * s[:, 1]), np.cos(np.pi * s[:, 2]), np.sin(np.pi * s[:, 0])], axis=1
    )


def through_known_map(points: np.ndarray) -> np.ndarray:
    moved = points + smooth_u(points)
    return moved @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def known_alignment() -> Alignment:
    """The map ``through_known_map`` as an Alignment on GRID."""
    points = GRID.index_to_physical(np.argwhere(np.ones(GRID.shape))[:, ::-1].astype(float))
    field = torch.as_tensor(smooth_u(points).T.reshape(1, 3, *GRID.shape), dtype=torch.float32)
    return Alignment(AFFINE, field, GRID)


def config(**overrides) -> RegistrationConfig:
    base = {"coarse.rematch_radius_mm": 0.0, "coarse.iterations": 300, "coarse.grid_divisor": 4,
            "coarse.smoothness": 0.001, **overrides}  # fmt: skip
    return RegistrationConfig(features="mind").with_overrides(base).resolved_for("mind")


def test_run_recovers_a_known_smooth_displacement_at_the_matched_points() -> None:
    moving = textured_body()
    fixed = pulled_through(moving, known_alignment())  # fixed(p) = moving(A(p + u(p)))
    matches = matches_through(through_known_map, count=600)
    context = StageContext(fixed, moving, matches=matches)
    start = Alignment.identity(GRID).with_affine(AFFINE)
    aligned, info = coarse.run(None, None, start, config(), context)
    assert "status" not in info, info.get("reason")
    before = np.linalg.norm(start.map_points(matches.fixed) - matches.moving, axis=1)
    after = np.linalg.norm(aligned.map_points(matches.fixed) - matches.moving, axis=1)
    assert before.mean() > 3.0
    assert after.mean() < 0.5, f"{before.mean():.2f} -> {after.mean():.2f} mm"
    np.testing.assert_array_equal(aligned.affine, AFFINE)  # the affine is kept as it was
    assert context.coarse is not None and context.coarse[1].shape == (9, 10, 11)
    assert info["point_error_after"] < info["point_error_before"]
    # The images agree with the recovered field: the similarity gate keeps it.
    assert info["similarity_after"] > info["similarity_before"] + config().coarse.min_gain


def noisy_identity_matches(count: int = 600, noise_mm: float = 1.0) -> Matches:
    """Matches of a scan to itself, each off by up to ``noise_mm`` per axis (sub-voxel error)."""
    exact = matches_through(lambda points: points, count=count)
    noise = np.random.default_rng(1).uniform(-noise_mm, noise_mm, size=exact.fixed.shape)
    return Matches(exact.fixed + noise, exact.moving, exact.similarity, count, count)


def test_a_field_fitted_to_the_noise_of_a_perfect_alignment_is_rejected() -> None:
    body = textured_body()
    context = StageContext(body, body, matches=noisy_identity_matches())
    start = Alignment.identity(GRID)
    kept, info = coarse.run(None, None, start, config(), context)
    assert kept is start and context.coarse is None
    assert info["status"] == "rejected" and "coarse.min_gain" in info["reason"]
    assert info["similarity_after"] < info["similarity_before"]
    assert info["point_error_after"] < info["point_error_before"]  # it did fit the noise

    # Without the gate the noise moves the map of identical scans by more than a working voxel.
    moved, info = coarse.run(None, None, start, config(**{"coarse.min_gain": -1.0}), context)
    assert "status" not in info and context.coarse is not None
    assert np.linalg.norm(moved.displacement_on(GRID), axis=-1).max() > GRID.spacing[0]


def test_too_few_matches_skip_the_stage_and_keep_the_alignment() -> None:
    start = Alignment.identity(GRID).with_affine(AFFINE)
    context = StageContext(matches=matches_through(through_known_map, count=3))
    aligned, info = coarse.run(None, None, start, config(), context)
    assert aligned is start
    assert info == {"status": "skipped", "reason": "too few matches", "detail": "3 matches"}
