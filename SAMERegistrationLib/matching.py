"""Point correspondences from embeddings: grid sampling, nearest-embedding search, SSCC.

Search runs on the feature grids (half the working resolution). Candidates are restricted to body
voxels inside the region both scans cover; similarity matrices are computed in chunks of queries
so memory stays bounded. Learned embeddings can be confidently wrong across patients, so besides
SSCC's similarity threshold a ratio test drops matches that have an almost as similar twin far
from the best.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import SAME_SIMILARITY_THRESHOLD, MatchingConfig, RegistrationConfig
from .features.base import FeatureMaps
from .shipped import file_sha256, read_record

log = logging.getLogger(__name__)

EDGE_FRACTION = 0.8  # windowed search: drop matches farther than this share of the radius
NO_SECOND = -1.0  # second-best similarity when no candidate lies outside the exclusion radius


@dataclass
class Matches:
    """Corresponding points in LPS mm: ``fixed[i]`` matches ``moving[i]`` with ``similarity[i]``."""

    fixed: np.ndarray  # (N, 3)
    moving: np.ndarray  # (N, 3)
    similarity: np.ndarray  # (N,)
    queried: int = 0  # grid points sampled in the moving body, inside the shared region
    stable: int = 0  # of those, kept by the cycle-consistency check
    outside: int = 0  # grid points of the moving body left out: outside the shared region

    def subset(self, keep: np.ndarray) -> Matches:
        """The matches where ``keep`` is true, with the same counts of queried points."""
        return Matches(
            self.fixed[keep], self.moving[keep], self.similarity[keep],
            self.queried, self.stable, self.outside,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.similarity)

    def summary(self) -> dict:
        sim = self.similarity
        return {
            "grid_points": self.queried,
            "outside_shared_region": self.outside,
            "cycle_consistent": self.stable,
            "kept": len(self),
            "mean_similarity": float(sim.mean()) if len(sim) else None,
        }


class _Side:
    """The body voxels of one image, flattened: descriptors, positions (mm) and a voxel lookup."""

    def __init__(self, maps: FeatureMaps, device: torch.device) -> None:
        flat_index = np.flatnonzero(maps.body.ravel())
        zyx = np.stack(np.unravel_index(flat_index, maps.body.shape), axis=1)
        self.positions = maps.grid.index_to_physical(zyx[:, ::-1].astype(np.float64))
        desc = maps.descriptor().to(device)
        self.volume = desc[0]  # (C, D, H, W), for sub-voxel refinement
        self.grid = maps.grid
        self.descriptors = desc.reshape(desc.shape[1], -1)[:, torch.as_tensor(flat_index)].T
        self.descriptors = self.descriptors.contiguous()
        self.lookup = np.full(maps.body.size, -1, dtype=np.int64)
        self.lookup[flat_index] = np.arange(len(flat_index))
        self.zyx = zyx
        self.shape = maps.body.shape
        self.positions_t = torch.as_tensor(self.positions, dtype=torch.float32, device=device)
        self.nearest = np.full(
            len(flat_index), -1, dtype=np.int64
        )  # memo: best match on other side
        self.best = np.zeros(len(flat_index), dtype=np.float32)
        self.second = np.full(len(flat_index), NO_SECOND, dtype=np.float32)  # for the ratio test
        self.active = np.ones(len(flat_index), dtype=bool)  # inside the region both scans cover

    def restrict_to(self, other: FeatureMaps, to_other: np.ndarray, margin_mm: float) -> None:
        """Keep active only the voxels that ``to_other`` (4x4, this side -> other side, mm) sends
        within ``margin_mm`` of the other body's bounding box."""
        body = np.argwhere(other.body)
        if len(body) == 0:
            self.active[:] = False
            return
        margin = margin_mm / np.asarray(other.grid.spacing[::-1], dtype=np.float64)
        lo, hi = body.min(axis=0) - margin, body.max(axis=0) + margin
        zyx = other.grid.physical_to_index(_apply(to_other, self.positions))[:, ::-1]
        self.active = np.all((zyx >= lo) & (zyx <= hi), axis=1)


def _search(
    queries: np.ndarray,
    source: _Side,
    target: _Side,
    expected: np.ndarray | None,
    radius_mm: float | None,
    memory_bytes: int,
    exclusion_mm: float | None = None,
) -> None:
    """Fill ``source.nearest``/``best`` for the query rows (indices into ``source``) not yet known,
    and ``source.second`` (the best farther than ``exclusion_mm`` from it) when that is given.
    Candidates are the active voxels of ``target``."""
    todo = queries[source.nearest[queries] < 0]
    if len(todo) == 0:
        return
    if radius_mm is None or expected is None:
        _search_global(todo, source, target, memory_bytes, exclusion_mm)
    else:
        _search_windowed(todo, source, target, expected, radius_mm, exclusion_mm)


def _search_global(
    todo: np.ndarray,
    source: _Side,
    target: _Side,
    memory_bytes: int,
    exclusion_mm: float | None,
) -> None:
    candidates = np.flatnonzero(target.active)
    if len(candidates) == 0:
        source.nearest[todo], source.best[todo] = 0, -2.0
        return
    cand = torch.as_tensor(candidates)
    keys = target.descriptors[cand]
    chunk = max(1, int(memory_bytes // (4 * keys.shape[0])))
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        sim = source.descriptors[torch.as_tensor(rows)] @ keys.T
        _take_best(sim, rows, candidates, source, target, exclusion_mm)


def _take_best(
    sim: torch.Tensor,
    rows: np.ndarray,
    candidates: np.ndarray,
    source: _Side,
    target: _Side,
    exclusion_mm: float | None,
) -> None:
    """Store the best candidate of each row of ``sim`` (rows x candidates), and the best one
    outside ``exclusion_mm`` of it as the second."""
    best, index = sim.max(dim=1)
    found = candidates[index.cpu().numpy()]
    source.nearest[rows] = found
    source.best[rows] = best.cpu().numpy()
    if exclusion_mm is None:
        return
    at_best = target.positions_t[torch.as_tensor(found)]
    near = torch.cdist(at_best, target.positions_t[torch.as_tensor(candidates)]) <= exclusion_mm
    second = sim.masked_fill(near, -2.0).max(dim=1).values.cpu().numpy()
    source.second[rows] = np.maximum(second, NO_SECOND)


def _search_windowed(
    todo: np.ndarray,
    source: _Side,
    target: _Side,
    expected: np.ndarray,
    radius_mm: float,
    exclusion_mm: float | None,
) -> None:
    """Search only keys within ``radius_mm`` of each query's expected position.

    Queries are sorted by position and processed in small groups, each against the keys inside
    the group's bounding box, so the cost grows with the window, not with the image.
    """
    centres = expected[todo]
    order = np.lexsort(np.round(centres / radius_mm).T[::-1])
    todo, centres = todo[order], centres[order]
    positions = target.positions
    for start in range(0, len(todo), 64):
        rows, centre = todo[start : start + 64], centres[start : start + 64]
        lo, hi = centre.min(axis=0) - radius_mm, centre.max(axis=0) + radius_mm
        box = np.all((positions >= lo) & (positions <= hi), axis=1) & target.active
        candidates = np.flatnonzero(box)
        if len(candidates) == 0:
            source.nearest[rows], source.best[rows] = 0, -2.0
            continue
        cand = torch.as_tensor(candidates)
        sim = source.descriptors[torch.as_tensor(rows)] @ target.descriptors[cand].T
        centre_t = torch.as_tensor(centre, dtype=torch.float32, device=sim.device)
        far = torch.cdist(centre_t, target.positions_t[cand]) > radius_mm
        _take_best(sim.masked_fill(far, -2.0), rows, candidates, source, target, exclusion_mm)


def grid_queries(maps: FeatureMaps, stride: int) -> np.ndarray:
    """Body voxels of the feature grid on a regular lattice of ``stride`` working voxels.

    Positions 3, 11, 19, ... of the working grid for stride 8, as in SAME, i.e. feature voxels
    1, 5, 9, ...
    """
    step = max(stride // 2, 1)
    first = (stride // 2 - 1) // 2 if stride > 1 else 0
    axes = [np.arange(first, n, step) for n in maps.body.shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    zyx = np.stack([z.ravel(), y.ravel(), x.ravel()], axis=1)
    return zyx[maps.body[zyx[:, 0], zyx[:, 1], zyx[:, 2]]]


def find_matches(
    fixed: FeatureMaps,
    moving: FeatureMaps,
    config: MatchingConfig,
    prior: np.ndarray | None = None,
    radius_mm: float | None = None,
    device: torch.device | str = "cpu",
) -> Matches:
    """Stable (cycle-consistent) correspondences for grid points of the moving image.

    ``prior`` is a 4x4 fixed->moving map. With ``radius_mm`` candidates must lie within that
    distance of where the prior sends the query; with no radius the search is global (SAME).
    With ``config.overlap_margin_mm`` set, queries and candidates are limited to the region both
    scans cover under the prior. Settings left null mean SAME's SSCC: threshold 0.7, no ratio test,
    no restriction (``RegistrationConfig.resolved_for`` fills the feature type's defaults).
    """
    device = torch.device(device)
    radius_mm = radius_mm or None  # 0 means the whole image, as SAME searches with SAM
    threshold = config.similarity_threshold
    threshold = SAME_SIMILARITY_THRESHOLD if threshold is None else threshold
    ratio_max = config.ratio_max if config.ratio_max is not None else 1.0
    exclusion_mm = (config.ratio_exclusion_mm or 0.0) if ratio_max < 1.0 else None
    prior = np.eye(4) if prior is None else prior
    fix, mov = _Side(fixed, device), _Side(moving, device)
    if config.overlap_margin_mm is not None:
        fix.restrict_to(moving, prior, config.overlap_margin_mm)
        mov.restrict_to(fixed, np.linalg.inv(prior), config.overlap_margin_mm)
    zyx = grid_queries(moving, config.grid_stride)
    q = mov.lookup[np.ravel_multi_index(zyx.T, mov.shape)] if len(zyx) else zyx[:, 0]
    outside = int((~mov.active[q]).sum())
    q = q[mov.active[q]]
    queried = len(q)
    if queried == 0:
        return Matches(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), 0, 0, outside)

    expected_in_fixed = _apply(np.linalg.inv(prior), mov.positions) if radius_mm else None
    expected_in_moving = _apply(prior, fix.positions) if radius_mm else None
    budget = int(config.chunk_memory_mb * 2**20)

    def to_fixed(rows: np.ndarray) -> np.ndarray:
        _search(rows, mov, fix, expected_in_fixed, radius_mm, budget, exclusion_mm)
        return mov.nearest[rows]

    def to_moving(rows: np.ndarray) -> np.ndarray:
        _search(rows, fix, mov, expected_in_moving, radius_mm, budget)
        return fix.nearest[rows]

    previous = q
    for _ in range(max(config.cycle_rounds, 1)):
        previous = q
        q = to_moving(to_fixed(q))
    stable = q == previous
    pairs = np.unique(np.stack([previous[stable], to_fixed(previous[stable])], axis=1), axis=0)
    similarity = mov.best[pairs[:, 0]]
    keep = similarity > threshold
    if exclusion_mm is not None:
        # (1 - best) / (1 - second): 1 for a twin as similar as the best, ~0 for a unique match.
        ratio = (1.0 - similarity + 1e-6) / (1.0 - mov.second[pairs[:, 0]] + 1e-6)
        keep &= ratio <= ratio_max
    if radius_mm is not None:
        # A best match on the rim of the window usually means the true match lies outside it.
        predicted = _apply(prior, fix.positions[pairs[:, 1]])
        offset = np.linalg.norm(predicted - mov.positions[pairs[:, 0]], axis=1)
        keep &= offset <= EDGE_FRACTION * radius_mm
    pairs, similarity = pairs[keep], similarity[keep]
    log.info(
        "matching: %d grid points (%d outside the shared region), %d cycle-consistent, "
        "%d kept (similarity > %.2f, ratio <= %.2f)",
        queried, outside, int(stable.sum()), len(pairs), threshold, ratio_max,
    )  # fmt: skip
    return Matches(
        fixed=_refine_subvoxel(
            fix, fix.zyx[pairs[:, 1]], mov.descriptors[torch.as_tensor(pairs[:, 0])]
        )
        if len(pairs)
        else np.zeros((0, 3)),
        moving=mov.positions[pairs[:, 0]],
        similarity=similarity.astype(np.float64),
        queried=queried,
        stable=int(stable.sum()),
        outside=outside,
    )


def model_similarity_threshold(weights: str | os.PathLike) -> float | None:
    """The similarity threshold calibrated for a SAM model: ``similarity_threshold`` in its record
    (``NAME.json`` beside ``NAME.pt``), used only when the record's SHA256 is that of the weights.
    None for a checkpoint without one (e.g. the official ``SAM.pth``, whose threshold is SAME's)."""
    weights = Path(weights)
    record = read_record(weights.with_suffix(".json"))
    value = record.get("similarity_threshold")
    if not isinstance(value, int | float) or isinstance(value, bool) or not -1 <= value < 1:
        return None
    if record.get("sha256") != file_sha256(weights):
        log.warning("%s: its record is for another file; its threshold is not used", weights)
        return None
    return float(value)


def with_model_threshold(
    config: RegistrationConfig, weights: str | os.PathLike | None
) -> RegistrationConfig:
    """``config`` with a null ``matching.similarity_threshold`` set to the SAM model's calibrated
    value, where its record has one; unchanged otherwise (then the feature default applies)."""
    if config.matching.similarity_threshold is not None or weights is None:
        return config
    value = model_similarity_threshold(weights)
    if value is None:
        return config
    return config.with_overrides({"matching.similarity_threshold": value})


def nearest_matches(
    fixed: FeatureMaps,
    moving: FeatureMaps,
    moving_zyx: np.ndarray,
    prior: np.ndarray | None = None,
    radius_mm: float | None = None,
    device: torch.device | str = "cpu",
    memory_mb: float = 256.0,
) -> Matches:
    """The nearest fixed embedding of each given moving feature voxel: one way, no cycle check,
    no threshold (what SSCC starts from). Voxels outside the moving body are dropped.

    ``moving_zyx`` are (N, 3) voxel indices of the moving feature grid; ``prior`` and
    ``radius_mm`` restrict the search as in ``find_matches``. Peaks are refined to sub-voxel
    precision as in ``find_matches``.
    """
    device = torch.device(device)
    radius_mm = radius_mm or None
    fix, mov = _Side(fixed, device), _Side(moving, device)
    zyx = np.asarray(moving_zyx, dtype=np.int64).reshape(-1, 3)
    inside = np.all((zyx >= 0) & (zyx < np.array(mov.shape)), axis=1)
    rows = mov.lookup[np.ravel_multi_index(zyx[inside].T, mov.shape)]
    rows = rows[rows >= 0]
    prior = np.eye(4) if prior is None else prior
    expected = _apply(np.linalg.inv(prior), mov.positions) if radius_mm else None
    _search(rows, mov, fix, expected, radius_mm, int(memory_mb * 2**20))
    found = mov.nearest[rows]
    fixed_mm = (
        _refine_subvoxel(fix, fix.zyx[found], mov.descriptors[torch.as_tensor(rows)])
        if len(rows)
        else np.zeros((0, 3))
    )
    return Matches(
        fixed=fixed_mm,
        moving=mov.positions[rows],
        similarity=mov.best[rows].astype(np.float64),
        queried=len(zyx),
        stable=0,
    )


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def _refine_subvoxel(side: _Side, zyx: np.ndarray, queries: torch.Tensor) -> np.ndarray:
    """Positions (mm) of the best matches refined to sub-voxel precision.

    Along each axis a parabola through the similarities at the matched voxel and its two
    neighbours gives the peak; the shift is clipped to half a voxel.
    """
    volume, shape = side.volume, np.array(side.shape)
    centre = _similarity_at(volume, zyx, queries)
    offset = np.zeros(zyx.shape, dtype=np.float64)
    for axis in range(3):
        step = np.zeros(3, dtype=int)
        step[axis] = 1
        lower = _similarity_at(volume, np.clip(zyx - step, 0, shape - 1), queries)
        upper = _similarity_at(volume, np.clip(zyx + step, 0, shape - 1), queries)
        curvature = lower - 2 * centre + upper
        with np.errstate(divide="ignore", invalid="ignore"):
            shift = np.where(curvature < -1e-9, 0.5 * (lower - upper) / curvature, 0.0)
        inside = (zyx[:, axis] > 0) & (zyx[:, axis] < shape[axis] - 1)
        offset[:, axis] = np.where(inside, np.clip(shift, -0.5, 0.5), 0.0)
    return side.grid.index_to_physical((zyx + offset)[:, ::-1])


def _similarity_at(volume: torch.Tensor, zyx: np.ndarray, queries: torch.Tensor) -> np.ndarray:
    z, y, x = (torch.as_tensor(zyx[:, i]) for i in range(3))
    keys = volume[:, z, y, x].T
    return (keys * queries).sum(dim=1).double().cpu().numpy()
