"""SAM-coarse: a coarse displacement grid fitted to the matches with a smoothness penalty.

The map is p -> A(p + u(p)) with u a coarse grid over the fixed working grid, optimised with Adam
in normalised units (half the grid extent = 1) as SAME does, so its weights carry over. The stage
fits u on top of the affine alone: any field of the incoming alignment is replaced. With
``coarse.rematch_radius_mm`` it first searches fresh matches within that radius around the affine.

Matches carry sub-voxel noise (about 0.8 mm on a scan matched to itself), and where they are few
(the body's border) the field follows that noise, up to a voxel and more beyond the body. So the
field is kept only if it raises the local NCC of the fixed and the pulled moving image inside the
fixed body by ``coarse.min_gain``; otherwise the stage returns the incoming alignment as "rejected"
(a perfect alignment has nothing to gain and must not move).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .. import spatial
from ..alignment import Alignment
from ..config import CoarseConfig, RegistrationConfig
from ..features.base import FeatureMaps
from ..grid import Grid
from ..matching import Matches, find_matches
from . import StageContext, skipped
from .similarity import DESCRIPTION, alignment_similarity, rejection

MIN_MATCHES = 4  # fewer matches than this leave the stage out


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext,
) -> tuple[Alignment, dict]:  # fmt: skip
    """The affine followed by a coarse field fitted to the matches (fresh ones if configured),
    or the incoming alignment when that field does not raise the image similarity enough."""
    matches = context.matches
    if config.coarse.rematch_radius_mm:
        matches = find_matches(
            fixed_maps, moving_maps, config.matching, alignment.affine,
            config.coarse.rematch_radius_mm, context.device,
        )  # fmt: skip
    if len(matches) < MIN_MATCHES:
        return alignment, skipped("too few matches", f"{len(matches)} matches")
    coarse, grid, info = fit_coarse(
        matches, alignment.affine, alignment.grid, config.coarse, context.device,
        lambda i, n, loss: context.report("coarse", i, n),
    )  # fmt: skip
    fitted = alignment.with_field(spatial.resample_field(coarse, grid, alignment.grid))
    before = alignment_similarity(context.fixed, context.moving, alignment)
    after = alignment_similarity(context.fixed, context.moving, fitted)
    info.update(
        displacement_max_mm=round(float(coarse.norm(dim=1).max()), 3),
        similarity=DESCRIPTION,
        similarity_before=round(before, 4),
        similarity_after=round(after, 4),
    )
    reason = rejection("coarse", "the coarse field", before, after, config.coarse.min_gain)
    if reason is not None:
        return alignment, {"status": "rejected", "reason": reason, **info}
    context.coarse = (coarse, grid)
    return fitted, info


def coarse_grid(working: Grid, divisor: int) -> Grid:
    """A grid with int(shape / divisor) nodes (at least 2) spanning the same box as ``working``."""
    shape = tuple(max(int(n / divisor), 2) for n in working.shape)
    extent = [(n - 1) * s for n, s in zip(working.size_xyz, working.spacing)]
    spacing = tuple(e / (n - 1) for e, n in zip(extent, shape[::-1]))
    return Grid(shape, spacing, working.origin, working.direction)


def fit_coarse(
    matches: Matches,
    affine: np.ndarray,
    working: Grid,
    config: CoarseConfig,
    device: torch.device,
    step: Callable[[int, int, float], None] | None = None,
) -> tuple[torch.Tensor, Grid, dict]:
    """Fit the coarse displacement (mm, on the returned coarse grid) to the matched points."""
    grid = coarse_grid(working, config.grid_divisor)
    scale = spatial.normalized_scale(working).to(device)
    fixed = torch.as_tensor(matches.fixed, dtype=torch.float32, device=device)
    target = torch.as_tensor(matches.moving, dtype=torch.float32, device=device)
    matrix = torch.as_tensor(affine, dtype=torch.float32, device=device)
    disp = torch.zeros((1, 3, *grid.shape), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([disp], lr=config.learning_rate)
    initial = _point_error(matrix, fixed, target, scale, grid, disp.detach())
    for it in range(config.iterations):
        optimiser.zero_grad()
        error = _point_error(matrix, fixed, target, scale, grid, disp)
        loss = error + config.smoothness * spatial.roughness(disp)
        loss.backward()
        optimiser.step()
        if step:
            step(it + 1, config.iterations, loss.item())
    final = _point_error(matrix, fixed, target, scale, grid, disp.detach())
    info = {
        "grid_size_xyz": list(grid.size_xyz),
        "point_error_before": float(initial),
        "point_error_after": float(final),
    }
    return disp.detach() * scale.view(1, 3, 1, 1, 1), grid, info


def _point_error(matrix, fixed, target, scale, grid, disp_normalised) -> torch.Tensor:
    disp_mm = spatial.sample_points(disp_normalised, grid, fixed) * scale
    predicted = spatial.apply_affine(matrix, fixed + disp_mm)
    return (((predicted - target) / scale) ** 2).sum(dim=1).mean()
