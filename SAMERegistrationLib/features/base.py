"""The feature interface every extractor implements."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..grid import Grid
from ..working import WorkingImage


@dataclass
class FeatureMaps:
    """Unit-length local and global embeddings on one feature grid (half the working resolution).

    ``local`` and ``global_`` are (1, C, D, H, W); voxel i of the feature grid sits on voxel 2i of
    the working grid. ``body`` is the body mask on the feature grid.
    """

    local: torch.Tensor
    global_: torch.Tensor
    grid: Grid
    body: np.ndarray
    # Local descriptors computed at the working grid's own resolution and averaged onto the
    # feature grid: finer detail for instance optimisation, which uses them in place of ``local``
    # when both scans have them. Matching and the deform network keep ``local``.
    fine: torch.Tensor | None = None

    def descriptor(self) -> torch.Tensor:
        """SAME's matching descriptor: global and local joined, scaled so that dot in [-1, 1]."""
        return torch.cat([self.global_, self.local], dim=1) / math.sqrt(2.0)


class FeatureExtractor(Protocol):
    name: str

    def extract(self, image: WorkingImage) -> FeatureMaps: ...


def feature_grid_and_mask(image: WorkingImage) -> tuple[Grid, np.ndarray]:
    """The half-resolution feature grid of a working image and its body mask (every 2nd voxel)."""
    return image.grid.downsampled(2), image.body[::2, ::2, ::2].copy()


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-8)
