"""Alternatives tried when the first matching and affine refuse a pair of plausible CT scans.

The first path starts from one translation and matches within a window around it. When the
fields of view differ (one scan cropped or masked to a box, the other reaching into the chest) the
translation search can land on the wrong anatomy (a box's cut edges resemble skin elsewhere), and
then too few matches are found. Before refusing, other starts are tried, each with the window
widened when it finds too few matches; each candidate affine is measured by how much of the
smaller body the two bodies share under it and by how well the local features agree there, and the
best that passes the first path's own checks is kept. When none passes, the first refusal stands:
scans of unrelated anatomy are still refused with their original error. Scans registered as placed
(``initialisation=identity``) keep their start: only the wider window is tried around it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..alignment import Alignment
from ..config import RegistrationConfig
from ..errors import RegistrationFailed
from ..features.base import FeatureMaps
from ..matching import Matches, find_matches
from ..spatial import sample_points
from ..working import WorkingImage
from . import StageContext, affine, initial

log = logging.getLogger(__name__)

MIN_OVERLAP = 0.2  # share of the smaller body that the other body must cover under the affine
# Mean cosine of the local features over the shared body under a candidate affine. Measured with
# MIND on OpenKBP: about 0.4-0.5 for the right anatomy, 0.2 when a cropped scan sits on the wrong
# anatomy.
MIN_AGREEMENT = 0.3
# Stricter minimum overlaps for the translation search: a scan cropped to a box lies wholly inside
# the other, so the true shift covers nearly all of the smaller body.
SEARCH_OVERLAPS = (0.7, 0.9)
WIDER_WINDOW = 2.0  # the matching window is widened by this factor when a start finds too few
SAME_START_MM = 8.0  # starts closer than this at the fixed body centre are one start


@dataclass
class Candidate:
    """One alternative path and what it measured."""

    path: str
    alignment: Alignment | None = None
    matches: Matches | None = None
    share: float = 0.0  # reliable matches / grid points queried
    overlap: float = 0.0
    agreement: float = -1.0
    window_mm: float | None = None
    refused: str | None = None
    affine: dict | None = None  # the affine stage's info

    def passes(self, min_share: float) -> bool:
        return (
            self.refused is None
            and self.share >= min_share
            and self.overlap >= MIN_OVERLAP
            and self.agreement >= MIN_AGREEMENT
        )

    def report(self) -> dict:
        info = {
            "path": self.path,
            "match_share": round(self.share, 3),
            "overlap_share": round(self.overlap, 3),
            "feature_agreement": round(self.agreement, 3),
            "window_mm": self.window_mm,
        }
        if self.refused:
            info["refused"] = self.refused
        return info


def overlap_share(fixed: WorkingImage, moving: WorkingImage, matrix: np.ndarray) -> float:
    """Share of the smaller body (in fixed space) lying on the other body under ``matrix``
    (fixed -> moving): a scan cropped to part of the other counts as wholly overlapping."""
    step = 2
    zyx = np.argwhere(fixed.body[::step, ::step, ::step]) * step
    if len(zyx) == 0:
        return 0.0
    points = fixed.grid.index_to_physical(zyx[:, ::-1].astype(np.float64))
    mapped = points @ matrix[:3, :3].T + matrix[:3, 3]
    idx = np.rint(moving.grid.physical_to_index(mapped)).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(moving.grid.size_xyz)), axis=1)
    covered = np.zeros(len(idx), dtype=bool)
    covered[inside] = moving.body[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    fixed_voxel = float(np.prod(fixed.grid.spacing))
    fixed_volume = float(fixed.body.sum()) * fixed_voxel
    moving_volume = float(moving.body.sum()) * float(np.prod(moving.grid.spacing))
    moving_volume /= max(abs(float(np.linalg.det(matrix[:3, :3]))), 1e-6)  # in fixed space
    shared = covered.sum() * step**3 * fixed_voxel
    return float(min(shared / max(min(fixed_volume, moving_volume), 1e-6), 1.0))


def feature_agreement(fixed: FeatureMaps, moving: FeatureMaps, matrix: np.ndarray) -> float:
    """Mean cosine of the local features at fixed body voxels (every 2nd) and where ``matrix``
    sends them, over those landing in the moving body; -1 when none does."""
    zyx = np.argwhere(fixed.body[::2, ::2, ::2]) * 2
    if len(zyx) == 0:
        return -1.0
    points = fixed.grid.index_to_physical(zyx[:, ::-1].astype(np.float64))
    mapped = torch.as_tensor(points @ matrix[:3, :3].T + matrix[:3, 3], dtype=torch.float32)
    body = torch.as_tensor(moving.body, dtype=torch.float32)[None, None]
    volume = torch.cat([moving.local.float().cpu(), body], dim=1)
    sampled = sample_points(volume, moving.grid, mapped)  # (N, C + 1)
    inside = sampled[:, -1] >= 0.5
    if not inside.any():
        return -1.0
    found = torch.nn.functional.normalize(sampled[inside, :-1], dim=1)
    local = fixed.local[0].float().cpu()[:, zyx[:, 0], zyx[:, 1], zyx[:, 2]].T[inside]
    return float((found * local).sum(dim=1).mean())


def starts(
    fixed: FeatureMaps, moving: FeatureMaps, first: np.ndarray, pose: np.ndarray | None,
    keep_placement: bool = False,
) -> list[tuple[str, np.ndarray]]:  # fmt: skip
    """Distinct starting translations: the first one (searched again in a wider window), the
    translation search with stricter overlaps, and the HU pose however weak its fit; only the
    first with ``keep_placement``."""
    found = [("first start, wider window", first)]
    if keep_placement:
        return found
    for min_overlap in SEARCH_OVERLAPS:
        matrix, info = initial.search_translation(fixed, moving, min_overlap)
        if np.isfinite(info["similarity"]):
            found.append((f"translation search over {min_overlap:.0%} overlap", matrix))
    if pose is not None:
        found.append(("initial pose from HU", pose))
    centre = initial.body_centre(fixed)
    distinct: list[tuple[str, np.ndarray]] = []
    for name, matrix in found:
        at = matrix[:3, :3] @ centre + matrix[:3, 3]
        if all(
            np.linalg.norm(at - (m[:3, :3] @ centre + m[:3, 3])) > SAME_START_MM
            for _, m in distinct
        ):
            distinct.append((name, matrix))
    return distinct


def try_start(
    path: str, start: np.ndarray, fixed_maps: FeatureMaps, moving_maps: FeatureMaps,
    alignment: Alignment, config: RegistrationConfig, context: StageContext,
) -> Candidate:  # fmt: skip
    """Matching from ``start`` (the window widened when too few are found), then the affine."""
    candidate = Candidate(path)
    radius = config.matching.search_radius_mm
    windows = [radius, radius * WIDER_WINDOW] if radius else [radius]
    for window in windows:
        matches = find_matches(fixed_maps, moving_maps, config.matching, start, window,
                               context.device)  # fmt: skip
        candidate.share = len(matches) / max(matches.queried, 1)
        candidate.window_mm = window
        if candidate.share >= config.matching.min_match_share:
            break
    context.matches = matches
    try:
        moved, candidate.affine = affine.run(fixed_maps, moving_maps, alignment.with_affine(start), config,
                              context)  # fmt: skip
    except RegistrationFailed as refusal:
        candidate.refused = str(refusal).split(". ")[0]
        return candidate
    candidate.alignment, candidate.matches = moved, context.matches
    candidate.overlap = overlap_share(context.fixed, context.moving, moved.affine)
    candidate.agreement = feature_agreement(fixed_maps, moving_maps, moved.affine)
    return candidate


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext, refusal: RegistrationFailed,
) -> tuple[Alignment, dict]:  # fmt: skip
    """The best alternative to a refused first path, or ``refusal`` raised again when none passes.

    ``alignment`` holds the first start; the chosen candidate's affine inliers are left in
    ``context.matches``. The info names every path tried, what it measured and which was kept.
    """
    tried = []
    keep_placement = config.keeps_placement
    found = starts(fixed_maps, moving_maps, alignment.affine, context.pose_start, keep_placement)
    for path, start in found:
        candidate = try_start(path, start, fixed_maps, moving_maps, alignment, config, context)
        log.info("fallback %s: %s", path, candidate.report())
        tried.append(candidate)
    passing = [c for c in tried if c.passes(config.matching.min_match_share)]
    info = {"reason": str(refusal), "tried": [c.report() for c in tried]}
    if not passing:
        if keep_placement:
            raise RegistrationFailed(
                f"{refusal} A window twice as wide around the start did not help. The scans "
                "were registered as placed (initialisation=identity): check their placement, or "
                "use initialisation=search to let the search find the start."
            )
        raise RegistrationFailed(f"{refusal} (alternatives tried: {len(tried)}, none passed)")
    best = max(passing, key=lambda c: c.agreement)
    context.matches = best.matches
    info["path"], info["affine"] = best.path, best.affine
    return best.alignment, info
