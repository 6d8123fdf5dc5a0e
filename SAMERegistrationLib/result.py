"""The outcome of a registration: one Alignment, and ways to apply it with SimpleITK.

The map from fixed to moving space (LPS mm) is the Alignment's ``p -> A (p + u(p))``: ``u`` is the
dense part of all deformable stages, sampled on the fixed working grid, and ``A`` the affine. ITK
calls this the resampling direction: warping the moving image onto the fixed grid pulls values
through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .alignment import Alignment
from .config import RegistrationConfig
from .features.base import FeatureMaps
from .grid import Grid, slab_bounds
from .matching import Matches


@dataclass
class RegistrationResult:
    fixed_grid: Grid  # grid of the fixed image as given (any direction)
    alignment: Alignment  # fixed -> moving, on the axis-aligned working grid of the fixed image
    matches: Matches
    config: RegistrationConfig  # resolved: features is the extractor used, never "auto"
    device: str
    stages: dict[str, dict] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    fixed_features: FeatureMaps | None = None
    moving_features: FeatureMaps | None = None
    warped_labels: sitk.Image | None = None  # the moving label map on the fixed grid, when given
    warnings: list[str] = field(default_factory=list)  # why the result may be wrong, if it may

    def __post_init__(self) -> None:
        self._transform: sitk.DisplacementFieldTransform | None = None

    @property
    def features(self) -> str:
        return self.config.features

    @property
    def affine(self) -> np.ndarray:
        """4x4, fixed -> moving, LPS mm."""
        return self.alignment.affine

    @property
    def dense(self) -> np.ndarray:
        """(3, D, H, W) float32 displacement u (x, y, z) in mm on ``working_grid``."""
        return self.alignment.field[0].detach().cpu().numpy().astype(np.float32)

    @property
    def working_grid(self) -> Grid:
        return self.alignment.grid

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map fixed-space points (N, 3, LPS mm) to moving space."""
        return self.alignment.map_points(points)

    def total_displacement(self) -> np.ndarray:
        """The whole map as a displacement on the fixed grid: (z, y, x, 3) float64 LPS mm."""
        return self.alignment.displacement_on(self.fixed_grid)

    def transform(self) -> sitk.DisplacementFieldTransform:
        """A SimpleITK transform of the whole map (fixed -> moving), usable with sitk.Resample."""
        if self._transform is None:
            self._transform = self.alignment.sitk_transform(self.fixed_grid)
        return self._transform

    def affine_transform(self) -> sitk.AffineTransform:
        """The affine stage alone as a SimpleITK transform (fixed -> moving)."""
        return self.alignment.affine_transform()

    def warp(self, moving: sitk.Image, labels: bool = False) -> sitk.Image:
        """Resample a moving-space image onto the fixed grid (linear, or nearest for labels).

        The fixed grid is visited slab by slab, with the map sampled on each slab only: the whole
        map on a large fixed grid would take 24 bytes a voxel at once.
        """
        interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        default = 0.0 if labels else float(sitk.GetArrayViewFromImage(moving).min())
        grid = self.fixed_grid
        pieces = []
        for z0, z1 in slab_bounds(grid.shape):
            slab = grid.crop((z0, 0, 0), (z1, *grid.shape[1:]))
            transform = self.alignment.sitk_transform(slab)
            piece = sitk.Resample(moving, slab.reference_image(), transform, interpolator, default)
            pieces.append(sitk.GetArrayFromImage(piece))
        vector = moving.GetNumberOfComponentsPerPixel() > 1
        return grid.apply_to(sitk.GetImageFromArray(np.concatenate(pieces), isVector=vector))
