"""Robust fit of the fixed->moving affine to point matches that include gross outliers.

Learned embeddings across patients give many confident but wrong matches; plain least squares
follows them. RANSAC on a similarity transform (rotation, one scale, translation: 3 matches
determine it) finds the largest set of matches that agree on one plausible transform; the affine
is then fitted by least squares to those inliers and trimmed again. An affine that stretches an
axis implausibly (or reflects) is refused in favour of the similarity.
"""

from __future__ import annotations

import numpy as np

from ..config import AffineConfig
from ..matching import Matches

SAMPLE_SIZE = 3  # matches per RANSAC hypothesis: the fewest that determine a similarity
BATCH = 200  # hypotheses scored at once (memory: BATCH x matches x 3 floats)
REFITS = 3  # least-squares refits on the current inliers


def least_squares_affine(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """The 4x4 affine minimising sum |A p_fixed - p_moving|^2."""
    centre = fixed.mean(axis=0)
    homogeneous = np.hstack([fixed - centre, np.ones((len(fixed), 1))])
    solution, *_ = np.linalg.lstsq(homogeneous, moving, rcond=None)
    matrix = np.eye(4)
    matrix[:3, :3] = solution[:3].T
    matrix[:3, 3] = solution[3] - solution[:3].T @ centre
    return matrix


def umeyama(fixed: np.ndarray, moving: np.ndarray, with_scale: bool = True) -> np.ndarray:
    """The similarity (or, without scale, rigid) 4x4 map closest to ``fixed -> moving`` in the
    least-squares sense (Umeyama 1991). ``fixed`` and ``moving`` are (N, 3), or (B, N, 3) for B
    problems at once (then (B, 4, 4) is returned)."""
    src, dst = np.asarray(fixed, dtype=np.float64), np.asarray(moving, dtype=np.float64)
    batched = src.ndim == 3
    if not batched:
        src, dst = src[None], dst[None]
    mu_s, mu_d = src.mean(axis=1, keepdims=True), dst.mean(axis=1, keepdims=True)
    s, d = src - mu_s, dst - mu_d
    cov = np.einsum("bni,bnj->bij", d, s) / src.shape[1]
    u, sigma, vt = np.linalg.svd(cov)
    sign = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    sign[sign == 0] = 1.0
    e = np.ones((len(src), 3))
    e[:, 2] = sign
    rotation = u @ (e[:, :, None] * vt)
    if with_scale:
        variance = (s**2).sum(axis=(1, 2)) / src.shape[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(variance > 1e-12, (sigma * e).sum(axis=1) / variance, np.nan)
    else:
        scale = np.ones(len(src))
    matrix = np.tile(np.eye(4), (len(src), 1, 1))
    matrix[:, :3, :3] = scale[:, None, None] * rotation
    matrix[:, :3, 3] = mu_d[:, 0] - np.einsum("bij,bj->bi", matrix[:, :3, :3], mu_s[:, 0])
    return matrix if batched else matrix[0]


def residuals(matrix: np.ndarray, fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Distance (mm) between where ``matrix`` sends each fixed point and its moving match."""
    return np.linalg.norm(fixed @ matrix[:3, :3].T + matrix[:3, 3] - moving, axis=1)


def inlier_mask(
    matrix: np.ndarray, fixed: np.ndarray, moving: np.ndarray, config: AffineConfig
) -> np.ndarray:
    """Matches within ``ransac_inlier_mm`` of the fit and, when ``outlier_factor`` > 0, within that
    many times the median residual of those (the trimming of the fit)."""
    residual = residuals(matrix, fixed, moving)
    keep = residual <= config.ransac_inlier_mm
    if config.outlier_factor and keep.any():
        keep &= residual <= config.outlier_factor * max(float(np.median(residual[keep])), 1e-6)
    return keep


def plausible(matrix: np.ndarray, config: AffineConfig) -> bool:
    """No reflection and every scale (singular value) within [min_scale, max_scale]."""
    linear = matrix[:3, :3]
    if not np.all(np.isfinite(linear)) or np.linalg.det(linear) <= 0:
        return False
    scales = np.linalg.svd(linear, compute_uv=False)
    return bool(scales.min() >= config.min_scale and scales.max() <= config.max_scale)


def ransac_similarity(
    fixed: np.ndarray, moving: np.ndarray, config: AffineConfig, rng: np.random.Generator
) -> np.ndarray:
    """Inlier mask of the similarity hypothesis (from 3 random matches) that most matches agree
    with; hypotheses with an implausible scale are not counted. Ties go to the smaller sum of
    inlier residuals."""
    n = len(fixed)
    best_count, best_cost, best = -1, np.inf, np.zeros(n, dtype=bool)
    iterations = int(config.ransac_iterations)
    for start in range(0, iterations, BATCH):
        size = min(BATCH, iterations - start)
        picks = np.argsort(rng.random((size, n)), axis=1)[:, :SAMPLE_SIZE]
        hypotheses = umeyama(fixed[picks], moving[picks])
        scale = np.cbrt(np.linalg.det(hypotheses[:, :3, :3]))
        valid = np.isfinite(scale) & (scale >= config.min_scale) & (scale <= config.max_scale)
        predicted = np.einsum("bij,nj->bni", hypotheses[:, :3, :3], fixed)
        error = np.linalg.norm(predicted + hypotheses[:, None, :3, 3] - moving[None], axis=2)
        inside = (error <= config.ransac_inlier_mm) & valid[:, None]
        counts = inside.sum(axis=1)
        costs = np.where(inside, error, 0.0).sum(axis=1)
        for b in np.flatnonzero(counts >= max(best_count, SAMPLE_SIZE)):
            if counts[b] > best_count or (counts[b] == best_count and costs[b] < best_cost):
                best_count, best_cost, best = int(counts[b]), float(costs[b]), inside[b]
    return best


def fit_robust(
    fixed: np.ndarray, moving: np.ndarray, config: AffineConfig, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The 4x4 fixed->moving map, its inlier mask and what was chosen (for the stage's info).

    RANSAC similarity -> similarity refit on its inliers -> affine least squares on the inliers,
    re-trimmed ``REFITS`` times -> the affine if plausible, else the similarity, else the rigid
    part. Needs at least 3 matches.
    """
    rng = np.random.default_rng(seed)
    keep = ransac_similarity(fixed, moving, config, rng)
    ransac_inliers = int(keep.sum())
    if ransac_inliers < SAMPLE_SIZE:  # no plausible hypothesis: start from all matches
        keep = np.ones(len(fixed), dtype=bool)
    similarity = umeyama(fixed[keep], moving[keep])
    for _ in range(REFITS):
        refit = inlier_mask(similarity, fixed, moving, config)
        if refit.sum() < SAMPLE_SIZE:
            break
        keep, similarity = refit, umeyama(fixed[refit], moving[refit])
    choice, reason = "similarity", None
    matrix = similarity
    if keep.sum() >= max(config.min_matches, 4):
        affine, affine_keep = least_squares_affine(fixed[keep], moving[keep]), keep
        for _ in range(REFITS):
            refit = inlier_mask(affine, fixed, moving, config)
            if refit.sum() < max(config.min_matches, 4):
                break
            affine_keep, affine = refit, least_squares_affine(fixed[refit], moving[refit])
        if plausible(affine, config):
            choice, matrix, keep = "affine", affine, affine_keep
        else:
            reason = "affine scales outside [min_scale, max_scale] or a reflection"
    else:
        reason = "too few inliers for an affine"
    if choice == "similarity" and not plausible(similarity, config):
        choice, reason = "rigid", "similarity scale outside [min_scale, max_scale]"
        matrix = umeyama(fixed[keep], moving[keep], with_scale=False)
    info = {"fit": choice, "ransac_inliers": ransac_inliers, "matches": len(fixed)}
    if reason:
        info["fit_reason"] = reason
    return matrix, inlier_mask(matrix, fixed, moving, config), info


def affine_inliers(matches: Matches, matrix: np.ndarray, config: AffineConfig) -> Matches:
    """The matches a robust fit of ``matrix`` counts as inliers (all of them without RANSAC)."""
    if not config.ransac_iterations or len(matches) == 0:
        return matches
    return matches.subset(inlier_mask(matrix, matches.fixed, matches.moving, config))
