"""SAM-affine: least-squares affine from matched points, refined by re-matching around it.

Each refinement pass (``affine.refine_radii_mm``) searches fresh matches within a radius around
the current affine's prediction and refits; the last matches become the pair's matches.
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

log = logging.getLogger(__name__)


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext,
) -> tuple[Alignment, dict]:  # fmt: skip
    """Fit the affine to ``context.matches``, then refine it by re-matching within each radius."""
    radii = config.affine.refine_radii_mm or []
    matrix, info = fit_affine(context.matches, config.affine)
    for i, radius in enumerate(radii):
        context.report("affine", i + 1, len(radii) + 1)
        context.matches = find_matches(
            fixed_maps, moving_maps, config.matching, matrix, radius, context.device
        )
        matrix, info = fit_affine(context.matches, config.affine)
    context.report("affine", len(radii) + 1, len(radii) + 1)
    return alignment.with_affine(matrix), info


def fit_affine(matches: Matches, config: AffineConfig) -> tuple[np.ndarray, dict]:
    """The 4x4 fixed->moving affine minimising sum |A p_fixed - p_moving|^2 (LPS mm)."""
    _require_enough(matches, config.min_matches)
    keep = np.ones(len(matches), dtype=bool)
    matrix = _least_squares(matches.fixed, matches.moving)
    if config.outlier_factor > 0:
        residual = _residuals(matrix, matches)
        keep = residual <= config.outlier_factor * max(float(np.median(residual)), 1e-6)
        if keep.sum() >= config.min_matches:
            matrix = _least_squares(matches.fixed[keep], matches.moving[keep])
    residual = _residuals(matrix, matches)[keep]
    info = {
        "matches_used": int(keep.sum()),
        "mean_residual_mm": float(residual.mean()),
        "scales": np.linalg.svd(matrix[:3, :3], compute_uv=False).round(4).tolist(),
        "determinant": float(np.linalg.det(matrix[:3, :3])),
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


def _least_squares(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    centre = fixed.mean(axis=0)
    homogeneous = np.hstack([fixed - centre, np.ones((len(fixed), 1))])
    solution, *_ = np.linalg.lstsq(homogeneous, moving, rcond=None)
    matrix = np.eye(4)
    matrix[:3, :3] = solution[:3].T
    matrix[:3, 3] = solution[3] - solution[:3].T @ centre
    return matrix


def _residuals(matrix: np.ndarray, matches: Matches) -> np.ndarray:
    predicted = matches.fixed @ matrix[:3, :3].T + matrix[:3, 3]
    return np.linalg.norm(predicted - matches.moving, axis=1)
