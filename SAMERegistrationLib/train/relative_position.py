"""A relative-position objective on SAM's global embedding (as in MedLAM).

A linear probe, without bias, reads the mm offset between two global voxels from the difference of
their embeddings: ``W (g_b - g_a) ~ (p_b - p_a) / scale``. This asks the global embedding to hold
body coordinates that are linear in position, which holds across patients when the pairs include
cross-patient views (their coordinates share the fixed scan's frame). The probe lives only during
training: checkpoints carry it for exact resumption, the final weights do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .crops import PairBatch

OFFSET_SCALE_MM = 100.0  # offsets are predicted in units of this many mm


def make_probe(embedding_dim: int) -> torch.nn.Linear:
    """The probe: embedding difference (C) -> offset (z, y, x) / OFFSET_SCALE_MM."""
    return torch.nn.Linear(embedding_dim, 3, bias=False)


def voxel_positions(batch: PairBatch, view: int) -> torch.Tensor:
    """LPS (z, y, x) mm of every global voxel of one view, flattened: (d * h * w, 3)."""
    z, y, x = (axis[view] for axis in batch.global_axes)
    grid = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, 3)


def position_loss(
    probe: torch.nn.Module, global_: torch.Tensor, batch: PairBatch, samples: int
) -> torch.Tensor:
    """Smooth-L1 error of the predicted offsets between ``samples`` random valid global voxels of
    each pair's first and second view, averaged over the pairs (randomness: torch's generator)."""
    global_ = global_.float()
    terms = []
    for pair in range(global_.shape[0] // 2):
        ends = []
        for view in (2 * pair, 2 * pair + 1):
            rows = batch.global_valid[view].reshape(-1).nonzero()[:, 0]
            if not rows.numel():
                break
            pick = rows[torch.randint(rows.numel(), (samples,), device=rows.device)]
            features = global_[view].reshape(global_.shape[1], -1).T[pick]
            ends.append((features, voxel_positions(batch, view)[pick]))
        if len(ends) < 2:
            continue
        (f_a, p_a), (f_b, p_b) = ends
        target = (p_b - p_a) / OFFSET_SCALE_MM
        terms.append(F.smooth_l1_loss(probe(f_b - f_a), target))
    if not terms:
        return global_.sum() * 0.0
    return torch.stack(terms).mean()
