"""SAM-affine: the affine from matched points, by robust fit (RANSAC) or least squares (SAME),
refined by re-matching around it.

Each refinement pass (``affine.refine_radii_mm``) searches fresh matches within a radius around
the current affine's prediction and refits; the matches the last fit kept (its inliers) become the
pair's matches.
"""

from __future__ import annotations

import logging

import numpy as np

from ..alignment import Alignment
from ..config import AffineConfig, RegistrationConfig
from ..errors import RegistrationFailed
from ..features.base import FeatureMaps
from ..matching import Matches, find_matches
from . import StageContext
from .robust_fit import affine_inliers, fit_robust
from .robust_fit import least_squares_affine as _least_squares

log = logging.getLogger(__name__)


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext,
) -> tuple[Alignment, dict]:  # fmt: skip
    """Fit the affine to ``context.matches``, then refine it by re-matching within each radius."""
    radii = config.affine.refine_radii_mm or []
    matrix, info = fit_affine(context.matches, config.affine, config.seed)
    for i, radius in enumerate(radii):
        context.report("affine", i + 1, len(radii) + 1)
        context.matches = find_matches(
            fixed_maps, moving_maps, config.matching, matrix, radius, context.device
        )
        matrix, info = fit_affine(context.matches, config.affine, config.seed)
    # What the affine was fitted to: the coarse stage fits these unless it re-matches.
    context.matches = affine_inliers(context.matches, matrix, config.affine)
    context.report("affine", len(radii) + 1, len(radii) + 1)
    return alignment.with_affine(matrix), info


def fit_affine(matches: Matches, config: AffineConfig, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The 4x4 fixed->moving affine (LPS mm): robust fit when ``config.ransac_iterations`` > 0
    (seeded by ``seed``), else least squares on all matches, trimmed by ``outlier_factor``."""
    _require_enough(matches, config.min_matches)
    keep = np.ones(len(matches), dtype=bool)
    robust = {}
    if config.ransac_iterations:
        matrix, keep, robust = fit_robust(matches.fixed, matches.moving, config, seed)
    else:
        matrix = _least_squares(matches.fixed, matches.moving)
    if config.outlier_factor > 0 and not config.ransac_iterations:
        residual = _residuals(matrix, matches)
        keep = residual <= config.outlier_factor * max(float(np.median(residual)), 1e-6)
        if keep.sum() >= config.min_matches:
            matrix = _least_squares(matches.fixed[keep], matches.moving[keep])
    residual = _residuals(matrix, matches)
    residual = residual[keep] if keep.any() else residual  # no inlier: say how far off all are
    info = {
        "matches_used": int(keep.sum()),
        "mean_residual_mm": float(residual.mean()),
        "scales": np.linalg.svd(matrix[:3, :3], compute_uv=False).round(4).tolist(),
        "determinant": float(np.linalg.det(matrix[:3, :3])),
        **robust,
    }
    log.info("affine: %d matches, mean residual %.2f mm", info["matches_used"], residual.mean())
    return matrix, info


def _require_enough(matches: Matches, minimum: int) -> None:
    minimum = max(minimum, 4)
    if len(matches) < minimum:
        raise RegistrationFailed(
            f"Only {len(matches)} reliable correspondences were found between the images "
            f"({matches.queried} grid points tried, {matches.stable} cycle-consistent); at least "
            f"{minimum} are needed for an affine. The scans may show different anatomy or not "
            "overlap. Check that both are CT of the same body region; lowering "
            "matching.similarity_threshold or a finer working spacing can help."
        )
    centred = matches.fixed - matches.fixed.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    if singular[-1] < 1e-3 * max(singular[0], 1e-9):
        raise RegistrationFailed(
            "The matched points lie on a plane or a line, so an affine is not determined. The "
            "scans may overlap only in a thin slab; give scans that share more anatomy."
        )


def _residuals(matrix: np.ndarray, matches: Matches) -> np.ndarray:
    predicted = matches.fixed @ matrix[:3, :3].T + matrix[:3, 3]
    return np.linalg.norm(predicted - matches.moving, axis=1)
