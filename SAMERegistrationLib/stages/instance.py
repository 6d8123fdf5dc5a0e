"""SAM instance optimisation: per-pair refinement of the field on feature similarity.

A displacement d on the fixed feature grid is optimised with Adam so that the moving features,
sampled through the current map after d, agree with the fixed features (cosine, local + global;
the finer local descriptors where the extractor gives them, ``FeatureMaps.fine``).
The result is the current map composed after (id + d), kept only if the similarity rose by
``instance.min_gain``: otherwise the stage returns the incoming alignment as "rejected", so that a
perfect alignment (nothing to gain) is not moved by the optimiser's drift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import spatial
from ..alignment import Alignment
from ..config import InstanceConfig, RegistrationConfig
from ..features.base import FeatureMaps
from . import StageContext


def run(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext | None = None,
) -> tuple[Alignment, dict]:  # fmt: skip
    """The alignment composed after the optimised refinement (id + d)."""
    context = context or StageContext()
    return optimise_instance(
        fixed_maps, moving_maps, alignment, config.instance,
        lambda i, n, loss: context.report("instance", i, n),
    )  # fmt: skip


def optimise_instance(
    fixed: FeatureMaps,
    moving: FeatureMaps,
    alignment: Alignment,
    config: InstanceConfig,
    step: Callable[[int, int, float], None] | None = None,
) -> tuple[Alignment, dict]:
    """Return the refined alignment and diagnostics."""
    device = fixed.local.device
    grid = fixed.grid
    scale = spatial.normalized_scale(grid).to(device).view(1, 3, 1, 1, 1)
    body = torch.as_tensor(fixed.body, device=device)
    if not bool(body.any()):
        body = torch.ones_like(body)
    # Evaluate the cost on every k-th body voxel: the displacement is smoothed over several voxels,
    # so a sparser cost changes little and saves most of the time on a CPU.
    k = config.cost_stride
    lattice = torch.zeros_like(body)
    lattice[::k, ::k, ::k] = True
    body = body & lattice
    points = spatial.voxel_points(grid, device)[0][body]  # (N, 3) body voxels of the fixed grid
    fixed_local, moving_local = fixed.local, moving.local
    if fixed.fine is not None and moving.fine is not None:
        fixed_local, moving_local = fixed.fine, moving.fine
    target = torch.cat([fixed.global_, fixed_local], dim=1)[0][:, body].T  # (N, C)
    # Moving features pulled through the current map once: M(phi(x + d)) ~ W(x + d).
    warped = alignment.pull(torch.cat([moving.global_, moving_local], dim=1), moving.grid, grid)
    half = fixed.global_.shape[1]

    def cost(disp_normalised: torch.Tensor) -> torch.Tensor:
        disp = spatial.smooth(disp_normalised, config.smoothing_passes) * scale
        shifted = points + disp[0][:, body].T
        sampled = spatial.sample_points(warped, grid, shifted)
        cos_global = F.cosine_similarity(sampled[:, :half], target[:, :half], dim=1, eps=1e-6)
        cos_local = F.cosine_similarity(sampled[:, half:], target[:, half:], dim=1, eps=1e-6)
        return -(cos_global.mean() + cos_local.mean())

    disp = torch.zeros((1, 3, *grid.shape), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([disp], lr=config.learning_rate)
    with torch.no_grad():
        initial = -float(cost(disp)) / 2
    for it in range(config.iterations):
        optimiser.zero_grad()
        loss = cost(disp) + config.smoothness * spatial.roughness(disp)
        loss.backward()
        optimiser.step()
        if step:
            step(it + 1, config.iterations, loss.item())
    with torch.no_grad():
        final = -float(cost(disp)) / 2
        d = spatial.smooth(disp, config.smoothing_passes) * scale
        refined = alignment.compose(spatial.resample_field(d, grid, alignment.grid))
    info = {"similarity_before": initial, "similarity_after": final}
    if final - initial < config.min_gain:
        reason = (
            f"the refinement raised the feature similarity from {initial:.4f} to {final:.4f}, "
            f"less than instance.min_gain ({config.min_gain:g}): alignment kept"
        )
        return alignment, {"status": "rejected", "reason": reason, **info}
    return refined, info
