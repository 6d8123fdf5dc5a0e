"""Point correspondences from embeddings: grid sampling, nearest-embedding search, SSCC.

Search runs on the feature grids (half the working resolution). Candidates are restricted to body
voxels; similarity matrices are computed in chunks of queries so memory stays bounded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .config import MatchingConfig
from .features.base import FeatureMaps

log = logging.getLogger(__name__)

EDGE_FRACTION = 0.8  # windowed search: drop matches farther than this share of the radius


@dataclass
class Matches:
    """Corresponding points in LPS mm: ``fixed[i]`` matches ``moving[i]`` with ``similarity[i]``."""

    fixed: np.ndarray  # (N, 3)
    moving: np.ndarray  # (N, 3)
    similarity: np.ndarray  # (N,)
    queried: int = 0  # grid points sampled in the moving body
    stable: int = 0  # of those, kept by the cycle-consistency check

    def __len__(self) -> int:
        return len(self.similarity)

    def summary(self) -> dict:
        sim = self.similarity
        return {
            "grid_points": self.queried,
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


def _search(
    queries: np.ndarray,
    source: _Side,
    target: _Side,
    expected: np.ndarray | None,
    radius_mm: float | None,
    memory_bytes: int,
) -> None:
    """Fill ``source.nearest``/``best`` for the query rows (indices into ``source``) not yet known."""
    todo = queries[source.nearest[queries] < 0]
    if len(todo) == 0:
        return
    if radius_mm is None or expected is None:
        _search_global(todo, source, target, memory_bytes)
    else:
        _search_windowed(todo, source, target, expected, radius_mm)


def _search_global(todo: np.ndarray, source: _Side, target: _Side, memory_bytes: int) -> None:
    keys = target.descriptors
    chunk = max(1, int(memory_bytes // (4 * keys.shape[0])))
    for start in range(0, len(todo), chunk):
        rows = todo[start : start + chunk]
        best, index = (source.descriptors[torch.as_tensor(rows)] @ keys.T).max(dim=1)
        source.nearest[rows] = index.cpu().numpy()
        source.best[rows] = best.cpu().numpy()


def _search_windowed(
    todo: np.ndarray, source: _Side, target: _Side, expected: np.ndarray, radius_mm: float
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
        candidates = np.flatnonzero(np.all((positions >= lo) & (positions <= hi), axis=1))
        if len(candidates) == 0:
            source.nearest[rows], source.best[rows] = 0, -2.0
            continue
        cand = torch.as_tensor(candidates)
        sim = source.descriptors[torch.as_tensor(rows)] @ target.descriptors[cand].T
        centre_t = torch.as_tensor(centre, dtype=torch.float32, device=sim.device)
        far = torch.cdist(centre_t, target.positions_t[cand]) > radius_mm
        best, index = sim.masked_fill(far, -2.0).max(dim=1)
        source.nearest[rows] = candidates[index.cpu().numpy()]
        source.best[rows] = best.cpu().numpy()


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

    ``prior`` is a 4x4 fixed->moving map used only with ``radius_mm``: candidates must lie within
    that distance of where the prior sends the query. With no radius the search is global (SAME).
    """
    device = torch.device(device)
    radius_mm = radius_mm or None  # 0 means the whole image, as SAME searches with SAM
    fix, mov = _Side(fixed, device), _Side(moving, device)
    zyx = grid_queries(moving, config.grid_stride)
    queried = len(zyx)
    if queried == 0:
        return Matches(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), 0, 0)
    flat = np.ravel_multi_index(zyx.T, mov.shape)
    q = mov.lookup[flat]

    prior = np.eye(4) if prior is None else prior
    expected_in_fixed = _apply(np.linalg.inv(prior), mov.positions) if radius_mm else None
    expected_in_moving = _apply(prior, fix.positions) if radius_mm else None
    budget = int(config.chunk_memory_mb * 2**20)

    def to_fixed(rows: np.ndarray) -> np.ndarray:
        _search(rows, mov, fix, expected_in_fixed, radius_mm, budget)
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
    keep = similarity > config.similarity_threshold
    if radius_mm is not None:
        # A best match on the rim of the window usually means the true match lies outside it.
        predicted = _apply(prior, fix.positions[pairs[:, 1]])
        offset = np.linalg.norm(predicted - mov.positions[pairs[:, 0]], axis=1)
        keep &= offset <= EDGE_FRACTION * radius_mm
    pairs, similarity = pairs[keep], similarity[keep]
    log.info(
        "matching: %d grid points, %d cycle-consistent, %d above similarity %.2f",
        queried,
        int(stable.sum()),
        len(pairs),
        config.similarity_threshold,
    )
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
    )


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
