"""stages/coarse.run: a smooth displacement known at the matched points is recovered on top of
the affine, and too few matches leave the stage out."""

import numpy as np
import torch
from _stage_pairs import GRID, matches_through

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.stages import StageContext, coarse

AFFINE = np.array(
    [[1.02, 0.0, 0.03, 5.0], [0.0, 0.98, 0.0, -3.0], [0.0, 0.02, 1.0, 2.0], [0, 0, 0, 1]]
)
LOW, HIGH = GRID.corners().min(axis=0), GRID.corners().max(axis=0)


def smooth_u(points: np.ndarray) -> np.ndarray:
    """A displacement of up to 4 mm that varies over the whole grid (half a period per axis)."""
    s = (points - LOW) / (HIGH - LOW)  # 0..1 across the grid
    return 4.0 * np.stack(
        [np.sin(np.pi * s[:, 1]), np.cos(np.pi * s[:, 2]), np.sin(np.pi * s[:, 0])], axis=1
    )


def through_known_map(points: np.ndarray) -> np.ndarray:
    moved = points + smooth_u(points)
    return moved @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def config(**overrides) -> RegistrationConfig:
    base = {"coarse.rematch_radius_mm": 0.0, "coarse.iterations": 300, "coarse.grid_divisor": 4,
            "coarse.smoothness": 0.001, **overrides}  # fmt: skip
    return RegistrationConfig(features="mind").with_overrides(base).resolved_for("mind")


def test_run_recovers_a_known_smooth_displacement_at_the_matched_points() -> None:
    torch.set_num_threads(1)
    matches = matches_through(through_known_map, count=600)
    context = StageContext(matches=matches)
    start = Alignment.identity(GRID).with_affine(AFFINE)
    aligned, info = coarse.run(None, None, start, config(), context)
    before = np.linalg.norm(start.map_points(matches.fixed) - matches.moving, axis=1)
    after = np.linalg.norm(aligned.map_points(matches.fixed) - matches.moving, axis=1)
    assert before.mean() > 3.0
    assert after.mean() < 0.5, f"{before.mean():.2f} -> {after.mean():.2f} mm"
    np.testing.assert_array_equal(aligned.affine, AFFINE)  # the affine is kept as it was
    assert context.coarse is not None and context.coarse[1].shape == (9, 10, 11)
    assert info["point_error_after"] < info["point_error_before"]


def test_too_few_matches_skip_the_stage_and_keep_the_alignment() -> None:
    start = Alignment.identity(GRID).with_affine(AFFINE)
    context = StageContext(matches=matches_through(through_known_map, count=3))
    aligned, info = coarse.run(None, None, start, config(), context)
    assert aligned is start
    assert info == {"status": "skipped", "reason": "too few matches", "detail": "3 matches"}
