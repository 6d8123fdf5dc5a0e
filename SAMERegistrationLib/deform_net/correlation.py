"""The SAM correlation input: local cosine similarity over the 3x3x3 neighbourhood.

Channel ``9a + 3b + c`` holds the cosine between the fixed embedding at voxel x and the moving
embedding at x + (a - 1, b - 1, c - 1) along (D, H, W); channel 13 is the zero offset. Moving
embeddings beyond the border repeat the border voxel (replicate padding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import spatial
from ..grid import Grid

ZERO_OFFSET = 13


def correlation(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """(1, C, D, H, W) embeddings on one grid -> (1, 27, D, H, W) cosine similarities."""
    fixed = F.normalize(fixed, dim=1, eps=1e-8)
    padded = F.pad(F.normalize(moving, dim=1, eps=1e-8), (1,) * 6, mode="replicate")
    d, h, w = fixed.shape[2:]
    channels = []
    for a in range(3):
        for b in range(3):
            for c in range(3):
                shifted = padded[:, :, a : a + d, b : b + h, c : c + w]
                channels.append((fixed * shifted).sum(dim=1))
    return torch.stack(channels, dim=1)


def correlation_input(
    fixed: tuple[torch.Tensor, ...],
    moving: tuple[torch.Tensor, ...],
    feature_grid: Grid,
    working: Grid,
) -> torch.Tensor:
    """The summed correlation of each (fixed, moving) map pair, on the network's half grid.

    The maps lie on ``feature_grid``; the result is resampled onto every second voxel of the
    working grid (``working.downsampled(2)``), the lattice of the U-Net's half-resolution level.
    """
    total = sum(correlation(f, m) for f, m in zip(fixed, moving))
    half = working.downsampled(2)
    if half.matches(feature_grid):
        return total
    return spatial.sample(total, feature_grid, spatial.voxel_points(half, total.device))
