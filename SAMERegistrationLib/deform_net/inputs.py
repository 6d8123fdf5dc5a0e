"""From a pre-aligned pair to the network's inputs; shared by registration and training.

The network sees the fixed image and the moving image pulled through the pre-alignment
``p -> A(p + u(p))`` onto the fixed working grid, both as the [-800, 400] HU window mapped to
[-1, 1] with air (-1) outside the body. Its correlation input compares the fixed embeddings with the
moving embeddings pulled through the same map: the features of the pulled moving image are
approximated by the pulled features of the moving image, so no second feature extraction runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..alignment import Alignment
from ..features.base import FeatureMaps
from ..grid import Grid
from ..working import WorkingImage, window_intensity
from .correlation import correlation_input


@dataclass
class DeformInputs:
    fixed: torch.Tensor  # (1, 1, D, H, W) window of the fixed image on the working grid
    moving: torch.Tensor  # (1, 1, D, H, W) window of the moving image, pulled through the map
    correlation: torch.Tensor | None  # (1, 27, ceil(D/2), ceil(H/2), ceil(W/2)), or None
    grid: Grid  # the fixed working grid
    # The moving (global, local) embeddings pulled onto the fixed feature grid, when asked for.
    moving_features: tuple[torch.Tensor, torch.Tensor] | None = None


def body_window(image: WorkingImage, device: torch.device | str) -> torch.Tensor:
    """The windowed image with air outside the body, (1, 1, D, H, W) float32."""
    values = np.where(image.body, window_intensity(image.hu), -1.0).astype(np.float32)
    return torch.as_tensor(values, device=device)[None, None]


def pull_features(
    moving: FeatureMaps, alignment: Alignment, target: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """The moving (global, local) embeddings pulled through the alignment onto ``target``."""
    both = torch.cat([moving.global_.float(), moving.local.float()], dim=1)
    pulled = alignment.pull(both, moving.grid, target)
    half = moving.global_.shape[1]
    return pulled[:, :half], pulled[:, half:]


def build_inputs(
    fixed: WorkingImage,
    moving: WorkingImage,
    fixed_maps: FeatureMaps | None,
    moving_maps: FeatureMaps | None,
    alignment: Alignment,
    with_correlation: bool,
    keep_features: bool = False,
) -> DeformInputs:
    """Network inputs for the pair pre-aligned by ``alignment`` (on the fixed working grid).

    The feature maps are needed only for the correlation or, with ``keep_features``, to return the
    pulled moving embeddings (for the SAM loss).
    """
    device = alignment.field.device
    pulled = alignment.pull(body_window(moving, device), moving.grid, fixed.grid)
    corr, pulled_maps = None, None
    if with_correlation or keep_features:
        pulled_maps = pull_features(moving_maps, alignment, fixed_maps.grid)
    if with_correlation:
        fixed_pair = (fixed_maps.global_.float(), fixed_maps.local.float())
        corr = correlation_input(fixed_pair, pulled_maps, fixed_maps.grid, fixed.grid)
    features = pulled_maps if keep_features else None
    return DeformInputs(body_window(fixed, device), pulled, corr, fixed.grid, features)
