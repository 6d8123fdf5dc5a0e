"""Initial alignment: the translation that best overlays the two bodies' global features.

Scans of different patients may start hundreds of mm apart (origins at the first voxel) and show
different extents of the body, so body centroids can mislead. An exhaustive search over all
translations, done with FFTs on a coarse grid, maximises the mean cosine similarity of the global
embeddings over the overlapping body, among shifts where the bodies overlap substantially.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..alignment import Alignment
from ..config import RegistrationConfig
from ..features.base import FeatureMaps
from . import StageContext

log = logging.getLogger(__name__)

SEARCH_SUBSAMPLING = 2  # search on every 2nd feature voxel (8 mm at the default 2 mm grid)
POSE_AGREEMENT_MM = 30.0  # the feature search's translation is kept within this of the HU pose


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext | None = None,
) -> tuple[Alignment, dict]:  # fmt: skip
    """The starting affine (a translation) by ``config.initialisation``; the field is kept."""
    mode = config.initialisation
    info: dict = {"method": mode}
    if mode == "search":
        matrix, found = search_translation(fixed_maps, moving_maps)
        info.update(found)
        pose = context.pose if context is not None else None
        matrix = _checked_by_pose(matrix, info, pose, body_centre(fixed_maps))
    elif mode == "centroid":
        matrix = centroid_translation(fixed_maps, moving_maps)
        info["translation_mm"] = matrix[:3, 3].round(2).tolist()
    else:
        matrix = np.eye(4)
    return alignment.with_affine(matrix), info


def centroid_translation(fixed: FeatureMaps, moving: FeatureMaps) -> np.ndarray:
    """4x4 fixed->moving translation putting the body centres on each other."""
    matrix = np.eye(4)
    matrix[:3, 3] = body_centre(moving) - body_centre(fixed)
    return matrix


def body_centre(maps: FeatureMaps) -> np.ndarray:
    """The body's centroid, LPS mm."""
    zyx = np.argwhere(maps.body).mean(axis=0)
    return maps.grid.index_to_physical(zyx[::-1][None])[0]


def search_translation(
    fixed: FeatureMaps, moving: FeatureMaps, min_overlap: float = 0.5
) -> tuple[np.ndarray, dict]:
    """4x4 fixed->moving translation maximising global-feature similarity over the overlap.

    Only shifts where the overlap covers at least ``min_overlap`` of the smaller body count.
    """
    k = SEARCH_SUBSAMPLING
    f_feat, f_mask = _coarse(fixed, k)
    m_feat, m_mask = _coarse(moving, k)
    shape = [a + b - 1 for a, b in zip(f_mask.shape, m_mask.shape)]
    # corr[t] = sum_x f(x) m(x + t), evaluated for every integer shift t at once.
    corr = _cross_correlate(f_feat, m_feat, shape)
    overlap = _cross_correlate(f_mask[None], m_mask[None], shape)
    needed = min_overlap * min(float(f_mask.sum()), float(m_mask.sum()))
    score = torch.where(overlap >= max(needed, 1.0), corr / overlap.clamp(min=1.0), -np.inf)
    best = int(torch.argmax(score))
    shift = np.array(np.unravel_index(best, score.shape))
    # Shifts are stored modulo the padded size; map to the signed range [-(f-1), m-1].
    shift = np.where(shift >= np.array(m_mask.shape), shift - np.array(shape), shift)
    spacing = np.array(fixed.grid.spacing) * k
    translation = np.array(moving.grid.origin) - np.array(fixed.grid.origin) + shift[::-1] * spacing
    matrix = np.eye(4)
    matrix[:3, 3] = translation
    info = {"translation_mm": translation.round(2).tolist(), "similarity": float(score.max())}
    return matrix, info


def _coarse(maps: FeatureMaps, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.as_tensor(maps.body[::k, ::k, ::k], dtype=torch.float32)
    feat = maps.global_[0, :, ::k, ::k, ::k].float().cpu() * mask
    return feat, mask


def _cross_correlate(f: torch.Tensor, m: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """sum over channels and x of f(x) m(x + t), indexed by t modulo ``shape``."""
    spectrum = torch.fft.rfftn(f, s=shape, dim=(1, 2, 3)).conj() * torch.fft.rfftn(
        m, s=shape, dim=(1, 2, 3)
    )
    return torch.fft.irfftn(spectrum.sum(dim=0), s=shape, dim=(0, 1, 2))


def _checked_by_pose(
    matrix: np.ndarray, info: dict, pose: np.ndarray | None, centre: np.ndarray
) -> np.ndarray:
    """The feature search's translation, or the HU pose where the two disagree at the body.

    Global features are not unique along a body (a neck resembles a chest wall), so with different
    fields of view the feature search can land far along z; the HU pose compares whole bodies.
    """
    if pose is None:
        return matrix
    apart = float(np.linalg.norm(_apply(matrix, centre) - _apply(pose, centre)))
    info["distance_to_pose_mm"] = round(apart, 1)
    if apart <= POSE_AGREEMENT_MM:
        return matrix
    log.info("initial translation from the HU pose (the feature search was %.0f mm off)", apart)
    info["replaced_by"] = "initial_pose"
    info["prior_matrix"] = pose.round(6).tolist()
    return pose


def _apply(matrix: np.ndarray, point: np.ndarray) -> np.ndarray:
    return matrix[:3, :3] @ point + matrix[:3, 3]
