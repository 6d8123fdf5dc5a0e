"""SAM instance optimisation: per-pair refinement of the field on feature similarity.

A displacement d on the fixed feature grid is optimised with Adam so that the moving features,
sampled through the current map after d, agree with the fixed features (cosine, local + global).
The result is the current map composed after (id + d).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .. import spatial
from ..config import InstanceConfig
from ..features.base import FeatureMaps
from ..grid import Grid
from .coarse import _roughness


def optimise_instance(
    fixed: FeatureMaps,
    moving: FeatureMaps,
    affine: np.ndarray,
    dense: torch.Tensor,
    dense_grid: Grid,
    config: InstanceConfig,
    step: Callable[[int, int, float], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Return the refined dense displacement on ``dense_grid`` and diagnostics."""
    device = fixed.local.device
    grid = fixed.grid
    scale = spatial.normalized_scale(grid).to(device).view(1, 3, 1, 1, 1)
    matrix = torch.as_tensor(affine, dtype=torch.float32, device=device)
    points = spatial.voxel_points(grid, device)
    body = torch.as_tensor(fixed.body, device=device)
    if not bool(body.any()):
        body = torch.ones_like(body)
    previous = spatial.resample_field(dense, dense_grid, grid)

    def cost(disp_normalised: torch.Tensor) -> torch.Tensor:
        disp = spatial.smooth(disp_normalised, config.smoothing_passes) * scale
        shifted = points + disp.permute(0, 2, 3, 4, 1)
        inner = spatial.sample(previous, grid, shifted).permute(0, 2, 3, 4, 1)
        mapped = spatial.apply_affine(matrix, shifted + inner)
        similarity = 0.0
        for fixed_map, moving_map in ((fixed.global_, moving.global_), (fixed.local, moving.local)):
            warped = spatial.sample(moving_map, moving.grid, mapped)
            cosine = torch.nn.functional.cosine_similarity(warped, fixed_map, dim=1, eps=1e-6)
            similarity = similarity + cosine[0][body].mean()
        return -similarity

    disp = torch.zeros((1, 3, *grid.shape), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([disp], lr=config.learning_rate)
    with torch.no_grad():
        initial = -float(cost(disp)) / 2
    for it in range(config.iterations):
        optimiser.zero_grad()
        loss = cost(disp) + config.smoothness * _roughness(disp)
        loss.backward()
        optimiser.step()
        if step:
            step(it + 1, config.iterations, float(loss))
    with torch.no_grad():
        final = -float(cost(disp)) / 2
        d = spatial.smooth(disp, config.smoothing_passes) * scale
        d = spatial.resample_field(d, grid, dense_grid)
        refined = spatial.compose(dense, d, dense_grid)
    return refined, {"similarity_before": initial, "similarity_after": final}
