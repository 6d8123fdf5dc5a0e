"""The outcome of a registration: one affine and one dense field, and ways to apply them.

The map from fixed to moving space (LPS mm) is ``p -> A (p + u(p))``: ``u`` is the dense part of
all deformable stages, sampled on the fixed working grid, and ``A`` the affine. ITK calls this the
resampling direction: warping the moving image onto the fixed grid pulls values through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from . import spatial
from .config import RegistrationConfig
from .features.base import FeatureMaps
from .grid import Grid
from .matching import Matches

SLAB_VOXELS = 4_000_000  # voxels per block when sampling the field on the full fixed grid


@dataclass
class RegistrationResult:
    fixed_grid: Grid  # grid of the fixed image as given (any direction)
    working_grid: Grid  # axis-aligned working grid of the fixed image
    affine: np.ndarray  # 4x4, fixed -> moving, LPS mm
    dense: np.ndarray  # (3, D, H, W) float32 displacement (x, y, z) in mm on working_grid
    matches: Matches
    config: RegistrationConfig
    features: str
    device: str
    stages: dict[str, dict] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    fixed_features: FeatureMaps | None = None
    moving_features: FeatureMaps | None = None
    warped_labels: sitk.Image | None = None  # the moving label map on the fixed grid, when given
    warnings: list[str] = field(default_factory=list)  # why the result may be wrong, if it may

    def __post_init__(self) -> None:
        self._transform: sitk.DisplacementFieldTransform | None = None

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map fixed-space points (N, 3, LPS mm) to moving space."""
        pts = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(-1, 3))
        dense = torch.as_tensor(self.dense, dtype=torch.float64)[None]
        moved = pts + spatial.sample_points(dense, self.working_grid, pts)
        return spatial.apply_affine(torch.as_tensor(self.affine), moved).numpy()

    def total_displacement(self) -> np.ndarray:
        """The whole map as a displacement on the fixed grid: (z, y, x, 3) float64 LPS mm."""
        grid = self.fixed_grid
        out = np.empty((*grid.shape, 3), dtype=np.float64)
        rows = max(1, SLAB_VOXELS // (grid.shape[1] * grid.shape[2]))
        y, x = np.meshgrid(np.arange(grid.shape[1]), np.arange(grid.shape[2]), indexing="ij")
        for z0 in range(0, grid.shape[0], rows):
            z = np.arange(z0, min(z0 + rows, grid.shape[0]))
            idx = np.stack(np.broadcast_arrays(x[None], y[None], z[:, None, None]), axis=-1)
            points = grid.index_to_physical(idx.reshape(-1, 3))
            out[z0 : z0 + len(z)] = (self.map_points(points) - points).reshape(len(z), *x.shape, 3)
        return out

    def displacement_image(self) -> sitk.Image:
        """The total displacement as a SimpleITK vector image on the fixed grid (ITK's layout)."""
        image = sitk.GetImageFromArray(self.total_displacement(), isVector=True)
        return self.fixed_grid.apply_to(image)

    def transform(self) -> sitk.DisplacementFieldTransform:
        """A SimpleITK transform of the whole map (fixed -> moving), usable with sitk.Resample."""
        if self._transform is None:
            self._transform = sitk.DisplacementFieldTransform(self.displacement_image())
        return self._transform

    def affine_transform(self) -> sitk.AffineTransform:
        """The affine stage alone as a SimpleITK transform (fixed -> moving)."""
        return sitk.AffineTransform(
            self.affine[:3, :3].ravel().tolist(), self.affine[:3, 3].tolist()
        )

    def warp(self, moving: sitk.Image, labels: bool = False) -> sitk.Image:
        """Resample a moving-space image onto the fixed grid (linear, or nearest for labels)."""
        interpolator = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
        default = 0.0 if labels else float(sitk.GetArrayViewFromImage(moving).min())
        return sitk.Resample(
            moving, self.fixed_grid.reference_image(), self.transform(), interpolator, default
        )
