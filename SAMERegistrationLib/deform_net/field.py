"""From the network's output (voxels, (x, y, z) channels) to a displacement in mm.

``svf``: the output is a stationary velocity field, integrated by scaling and squaring into a
diffeomorphic displacement; ``dvf``: the output is the displacement itself (no guarantee against
folding; kept for comparison).
"""

from __future__ import annotations

import torch

from .. import spatial
from ..grid import Grid

VARIANTS = ("svf", "dvf")


def voxels_to_mm(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Scale a (1, 3, D, H, W) field in voxels, channels (x, y, z), to LPS mm on ``grid``."""
    spacing = torch.tensor(grid.spacing, dtype=field.dtype, device=field.device)
    return field * spacing.view(1, 3, 1, 1, 1)


def displacement(output: torch.Tensor, grid: Grid, variant: str, steps: int) -> torch.Tensor:
    """The displacement (mm, (1, 3, D, H, W)) that the network's output describes on ``grid``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    field = voxels_to_mm(output.float(), grid)
    if variant == "svf":
        return spatial.integrate_velocity(field, grid, steps)
    return field
