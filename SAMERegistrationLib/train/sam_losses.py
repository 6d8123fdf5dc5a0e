"""SAM's contrastive losses: InfoNCE on the local and the global map with hard-and-diverse negatives.

For each pair of views and each direction (view a -> view b), a query is a valid voxel of a whose
nearest voxel of b (in mm) is valid and close enough; that voxel is its positive key. Views are
axis-aligned grids, so the nearest voxel is found axis by axis from the recorded coordinate
vectors. Negatives are voxels of both views, scored against the query without gradient; voxels
within the ignore distance of the query's physical point, the key itself and invalid voxels are
excluded; the ``hard`` best-scoring remain, and ``diverse`` of them are drawn at random. The global
loss adds negatives drawn at random from the other pairs of the batch (other volumes). A direction
with no overlap uses the query itself as its key, so its negatives are still pushed apart.
Randomness comes from torch's global generator of the features' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .run import LossTerms
from .views import PairBatch


@dataclass(frozen=True)
class LossConfig:
    """InfoNCE settings (defaults: same-code-facts.md section 3, SAME's config)."""

    temperature: float = 0.5
    local_positive_mm: float = 5.0  # a query's nearest voxel in the other view must be this close
    local_ignore_mm: float = 3.0  # voxels this close to the query are never negatives
    local_queries: int = 100  # per direction and pair
    local_hard: int = 2000  # best-scoring negative candidates (fine + global similarity)
    local_diverse: int = 500  # drawn from the hard ones
    global_positive_mm: float = 25.0
    global_positive_dz_mm: float = 6.0  # and at most this far apart in z
    global_ignore_mm: float = 5.0
    global_hard: int = 250
    global_diverse: int = 200
    global_cross: int = 300  # random negatives from the batch's other volumes
    # Pairs of two patients through a registration map (cross_patient): the map is a teacher with
    # errors of several mm, so local positives may lie farther and neighbours are not negatives.
    cross_local_positive_mm: float = 8.0
    cross_local_ignore_mm: float = 20.0
    cross_local_weight: float = 1.0  # 0: such pairs train the global embedding only
    # The relative-position probe on the global embedding (relative_position); 0: off.
    position_weight: float = 0.0
    position_samples: int = 256  # voxel pairs per crop pair


def sam_loss(
    local: torch.Tensor, global_: torch.Tensor, batch: PairBatch, config: LossConfig
) -> LossTerms:
    """Local + global InfoNCE, each averaged over the pairs of the batch (computed in float32)."""
    local, global_ = local.float(), global_.float()
    pairs = local.shape[0] // 2
    # The global map upsampled to the local grid joins the local one to score local negatives.
    global_up = F.normalize(
        F.interpolate(global_.detach(), local.shape[2:], mode="trilinear", align_corners=False),
        dim=1,
    )
    local_terms, global_terms = [], []
    for pair in range(pairs):
        views = slice(2 * pair, 2 * pair + 2)
        cross_patient = bool(batch.cross_patient) and batch.cross_patient[pair]
        weight = config.cross_local_weight if cross_patient else 1.0
        local_term = None
        if weight > 0:
            local_term = _pair_loss(
                local[views],
                mining=torch.cat([local[views], global_up[views]], dim=1).detach(),
                axes=tuple(a[views] for a in batch.local_axes),
                valid=batch.local_valid[views],
                cross=None,
                positive_mm=config.cross_local_positive_mm
                if cross_patient
                else config.local_positive_mm,
                positive_dz_mm=None,
                ignore_mm=config.cross_local_ignore_mm if cross_patient else config.local_ignore_mm,
                queries=config.local_queries,
                hard=config.local_hard,
                diverse=config.local_diverse,
                temperature=config.temperature,
            )
        local_terms.append(None if local_term is None else weight * local_term)
        others = [v for v in range(local.shape[0]) if v // 2 != pair]
        cross = _flatten(global_[others])[batch.global_valid[others].reshape(-1)]
        global_terms.append(
            _pair_loss(
                global_[views],
                mining=global_[views].detach(),
                axes=tuple(a[views] for a in batch.global_axes),
                valid=batch.global_valid[views],
                cross=_random_rows(cross, config.global_cross),
                positive_mm=config.global_positive_mm,
                positive_dz_mm=config.global_positive_dz_mm,
                ignore_mm=config.global_ignore_mm,
                queries=None,
                hard=config.global_hard,
                diverse=config.global_diverse,
                temperature=config.temperature,
            )
        )
    local_loss = _mean(local_terms, local)
    global_loss = _mean(global_terms, global_)
    return LossTerms(local_loss + global_loss, {"local": local_loss, "global": global_loss})


def _mean(terms: list[torch.Tensor | None], features: torch.Tensor) -> torch.Tensor:
    kept = [t for t in terms if t is not None]
    if not kept:  # no view had a valid voxel: a zero that still belongs to the graph
        return features.sum() * 0.0
    return torch.stack(kept).mean()


def _flatten(maps: torch.Tensor) -> torch.Tensor:
    """(V, C, D, H, W) -> (V * D * H * W, C)."""
    return maps.permute(0, 2, 3, 4, 1).reshape(-1, maps.shape[1])


def _random_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    return rows[torch.randperm(rows.shape[0], device=rows.device)[:count]]


def nearest_partners(
    axes_a: tuple[torch.Tensor, ...], axes_b: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every voxel of grid a: the flat index of the nearest voxel of grid b, the distance to it
    and its |dz|, all (d_a, h_a, w_a). Both grids are axis-aligned, given by their coordinate
    vectors (z, y, x) in mm, so the nearest voxel is the nearest coordinate along each axis.
    """
    index, offset = [], []
    for coord_a, coord_b in zip(axes_a, axes_b):
        difference = coord_a[:, None] - coord_b[None, :]
        nearest = difference.abs().argmin(dim=1)
        index.append(nearest)
        offset.append(difference.gather(1, nearest[:, None])[:, 0])
    h_b, w_b = len(axes_b[1]), len(axes_b[2])
    flat = (index[0][:, None, None] * h_b + index[1][None, :, None]) * w_b + index[2][None, None, :]
    distance = (
        offset[0][:, None, None] ** 2
        + offset[1][None, :, None] ** 2
        + offset[2][None, None, :] ** 2
    ).sqrt()
    dz = offset[0].abs()[:, None, None].expand_as(distance)
    return flat, distance, dz


def _squared_distances(points: torch.Tensor, axes: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(Q, 3) points (z, y, x mm) to every voxel of an axis-aligned grid: (Q, d * h * w)."""
    parts = [(points[:, a, None] - axes[a][None, :]) ** 2 for a in range(3)]
    total = parts[0][:, :, None, None] + parts[1][:, None, :, None] + parts[2][:, None, None, :]
    return total.reshape(points.shape[0], -1)


def _pair_loss(
    maps: torch.Tensor,
    *,
    mining: torch.Tensor,
    axes: tuple[torch.Tensor, ...],
    valid: torch.Tensor,
    cross: torch.Tensor | None,
    positive_mm: float,
    positive_dz_mm: float | None,
    ignore_mm: float,
    queries: int | None,
    hard: int,
    diverse: int,
    temperature: float,
) -> torch.Tensor | None:
    """InfoNCE of one pair of views, both directions: maps (2, C, d, h, w), mining the features
    that score negatives, axes three (2, n) coordinate tensors, valid (2, d, h, w)."""
    features = _flatten(maps)  # (2N, C): view 0 then view 1
    scorers = _flatten(mining)
    view_axes = [tuple(a[v] for a in axes) for v in range(2)]
    voxels = valid[0].numel()
    all_valid = valid.reshape(-1)
    rows = []
    for a in range(2):
        b = 1 - a
        flat, distance, dz = nearest_partners(view_axes[a], view_axes[b])
        candidates = valid[a] & valid[b].reshape(-1)[flat] & (distance < positive_mm)
        if positive_dz_mm is not None:
            candidates &= dz < positive_dz_mm
        query = candidates.reshape(-1).nonzero()[:, 0]
        if query.numel():
            key = flat.reshape(-1)[query] + b * voxels
        else:  # no overlap: the query is its own key
            query = valid[a].reshape(-1).nonzero()[:, 0]
            key = query + a * voxels
        if queries is not None and query.numel() > queries:
            keep = torch.randperm(query.numel(), device=query.device)[:queries]
            query, key = query[keep], key[keep]
        if not query.numel():
            continue
        h, w = valid.shape[2:]
        points = torch.stack(
            [
                view_axes[a][0][query // (h * w)],
                view_axes[a][1][query // w % h],
                view_axes[a][2][query % w],
            ],
            dim=1,
        )
        query_rows = query + a * voxels
        with torch.no_grad():
            near = torch.cat([_squared_distances(points, view_axes[v]) for v in range(2)], dim=1)
            blocked = (near < ignore_mm**2) | ~all_valid[None, :]
            blocked[torch.arange(len(key), device=key.device), key] = True
            scores = (scorers[query_rows] @ scorers.T).masked_fill(blocked, float("-inf"))
            best = scores.topk(min(hard, scores.shape[1]), dim=1).indices
            pick = torch.rand(best.shape, device=best.device).argsort(dim=1)[:, :diverse]
            negative = best.gather(1, pick)
            excluded = blocked.gather(1, negative)
        q = features[query_rows]
        positive = (q * features[key]).sum(dim=1, keepdim=True)
        negatives = torch.einsum("qc,qkc->qk", q, features[negative]).masked_fill(
            excluded, float("-inf")
        )
        logits = [positive, negatives]
        if cross is not None and cross.shape[0]:
            logits.append(q @ cross.T)
        rows.append(torch.cat(logits, dim=1))
    if not rows:
        return None
    logits = torch.cat(rows) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
