"""stages/affine.run: least squares recovers a known affine from matches, outliers are trimmed,
and the refinement passes re-match around the current affine."""

import numpy as np
import pytest
from _stage_pairs import GRID, matches_through, mind_maps, shifted, textured_body

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.errors import RegistrationFailed
from SAMERegistrationLib.matching import Matches, find_matches
from SAMERegistrationLib.stages import StageContext, affine

KNOWN = np.array(
    [[1.04, 0.05, -0.02, 12.0], [-0.03, 0.96, 0.04, -7.5], [0.02, -0.01, 1.02, 4.0], [0, 0, 0, 1]]
)


def apply(points: np.ndarray) -> np.ndarray:
    return points @ KNOWN[:3, :3].T + KNOWN[:3, 3]


def config(**overrides) -> RegistrationConfig:
    return RegistrationConfig(features="mind").with_overrides(overrides).resolved_for("mind")


def test_run_recovers_a_known_affine_from_exact_matches() -> None:
    context = StageContext(matches=matches_through(apply))
    cfg = config(**{"affine.refine_radii_mm": []})
    aligned, info = affine.run(None, None, Alignment.identity(GRID), cfg, context)
    probes = GRID.corners()
    error = np.linalg.norm(aligned.map_points(probes) - apply(probes), axis=1)
    assert error.max() < 0.1, error
    assert info["mean_residual_mm"] < 1e-6
    assert info["determinant"] == pytest.approx(np.linalg.det(KNOWN[:3, :3]))


def test_outliers_are_trimmed_before_the_final_fit() -> None:
    matches = matches_through(apply, seed=1)
    rng = np.random.default_rng(2)
    wrong = rng.choice(len(matches), size=30, replace=False)
    matches.moving[wrong] += rng.normal(0, 40, size=(30, 3))
    cfg = config(**{"affine.refine_radii_mm": [], "affine.outlier_factor": 2.0})
    aligned, info = affine.run(
        None, None, Alignment.identity(GRID), cfg, StageContext(matches=matches)
    )
    error = np.linalg.norm(aligned.map_points(GRID.corners()) - apply(GRID.corners()), axis=1)
    assert error.max() < 0.1, error
    assert info["matches_used"] <= len(matches) - 30


def test_too_few_matches_are_refused_with_a_reason() -> None:
    few = matches_through(apply, count=5)
    with pytest.raises(RegistrationFailed, match="Only 5 reliable correspondences"):
        affine.run(None, None, Alignment.identity(GRID), config(), StageContext(matches=few))


def test_refinement_passes_rematch_around_the_current_affine(one_thread) -> None:
    shift = np.array([6.0, -4.0, 8.0])
    fixed = textured_body()
    moving = shifted(fixed, shift)
    fixed_maps, moving_maps = mind_maps(fixed, moving)
    cfg = config(**{"affine.refine_radii_mm": [10.0, 5.0]})
    start = Alignment.identity(GRID).with_affine(np.eye(4))
    start_matches = find_matches(fixed_maps, moving_maps, cfg.matching, None, 0.0)
    context = StageContext(fixed, moving, matches=start_matches)
    aligned, _ = affine.run(fixed_maps, moving_maps, start, cfg, context)
    assert context.matches is not start_matches  # the last pass's matches replace the first
    assert isinstance(context.matches, Matches) and len(context.matches) > 20
    points = fixed_maps.grid.index_to_physical(np.argwhere(fixed_maps.body)[:, ::-1].astype(float))
    error = np.linalg.norm(aligned.map_points(points) - (points + shift), axis=1)
    assert error.mean() < 1.0, error.mean()
