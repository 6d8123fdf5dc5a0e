"""The image similarity that decides whether a stage's field is kept (coarse and deform).

Local NCC of the fixed image and the moving image pulled through an alignment, both as the soft
tissue window with air outside the body, averaged inside the fixed body. It reads the images
themselves, so it judges a field independently of the features and matches it was fitted to.
"""

from __future__ import annotations

import logging

import torch

from ..alignment import Alignment
from ..deform_net.inputs import body_window
from ..train.deform_losses import local_ncc
from ..working import WorkingImage

#: Local NCC over cubes of this many working voxels.
SIMILARITY_WINDOW = 9
DESCRIPTION = f"local NCC ({SIMILARITY_WINDOW}-voxel window) in the fixed body"

log = logging.getLogger(__name__)


def pulled_window(moving: WorkingImage, alignment: Alignment, fixed: WorkingImage) -> torch.Tensor:
    """The moving image's intensity window pulled through ``alignment`` onto the fixed grid."""
    window = body_window(moving, alignment.field.device)
    return alignment.pull(window, moving.grid, fixed.grid)


def local_similarity(
    fixed: WorkingImage, fixed_window: torch.Tensor, pulled: torch.Tensor
) -> float:
    """Local NCC of the fixed window and a pulled moving window, inside the fixed body."""
    body = torch.as_tensor(fixed.body, device=pulled.device)[None, None]
    return float(local_ncc(fixed_window, pulled, body, SIMILARITY_WINDOW))


def alignment_similarity(fixed: WorkingImage, moving: WorkingImage, alignment: Alignment) -> float:
    """Local NCC of the fixed image and the moving image pulled through ``alignment``."""
    with torch.no_grad():
        fixed_window = body_window(fixed, alignment.field.device)
        return local_similarity(fixed, fixed_window, pulled_window(moving, alignment, fixed))


def rejection(stage: str, field: str, before: float, after: float, min_gain: float) -> str | None:
    """Why ``stage`` must keep its incoming alignment (the similarity gained too little), else None."""
    if after - before >= min_gain:
        return None
    reason = (
        f"{field} changed the local NCC from {before:.4f} to {after:.4f}, less than "
        f"{stage}.min_gain ({min_gain:g}) better: alignment kept"
    )
    log.info("%s stage rejected: %s", stage, reason)
    return reason
