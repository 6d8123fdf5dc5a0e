"""The library's one transform type: an affine after a displacement field.

An ``Alignment`` maps a fixed point p (LPS mm) to moving space as ``p -> A(p + u(p))``: ``u`` is a
(1, 3, D, H, W) displacement in mm, channels (x, y, z), on the axis-aligned fixed working grid,
and ``A`` a 4x4 affine. This is ITK's resampling direction: warping the moving image onto the fixed
grid pulls values through the map. Every stage takes one Alignment and returns the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import spatial
from .grid import Grid, slabs


@dataclass(frozen=True, eq=False)  # arrays do not compare as one truth value
class Alignment:
    affine: np.ndarray  # 4x4 fixed -> moving, LPS mm, float64
    field: torch.Tensor  # (1, 3, D, H, W) displacement u in mm on ``grid``
    grid: Grid  # axis-aligned fixed working grid

    @classmethod
    def identity(cls, grid: Grid, device: torch.device | str = "cpu") -> Alignment:
        return cls(np.eye(4), torch.zeros((1, 3, *grid.shape), device=device), grid)

    def with_affine(self, affine: np.ndarray) -> Alignment:
        return replace(self, affine=np.asarray(affine, dtype=np.float64))

    def with_field(self, field: torch.Tensor) -> Alignment:
        return replace(self, field=field)

    def compose(self, inner: torch.Tensor) -> Alignment:
        """This map applied after ``id + inner`` (a displacement on the same grid, mm)."""
        return self.with_field(spatial.compose(self.field, inner, self.grid))

    def affine_tensor(self) -> torch.Tensor:
        return torch.as_tensor(self.affine, dtype=torch.float32, device=self.field.device)

    def pull(
        self, volume: torch.Tensor, volume_grid: Grid, target: Grid | None = None, mode="bilinear"
    ) -> torch.Tensor:
        """A moving-space (1, C, ...) volume sampled through the map at the voxels of ``target``."""
        target = target or self.grid
        return spatial.pull(
            volume, volume_grid, self.affine_tensor(), self.field, self.grid, target, mode
        )

    def map_points(self, points: np.ndarray) -> np.ndarray:
        """Map fixed-space points (N, 3, LPS mm) to moving space, in float64."""
        pts = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(-1, 3))
        moved = pts + self.deformable_at(pts)
        return spatial.apply_affine(torch.as_tensor(self.affine), moved).numpy()

    def deformable_at(self, points: torch.Tensor) -> torch.Tensor:
        """u at (N, 3) float64 fixed points; outside the working grid u takes its border value."""
        field = self.field.detach().to("cpu", torch.float64)
        return spatial.sample_points(field, self.grid, points)

    def orientation(self) -> float:
        """+1 where the affine keeps handedness, -1 where it mirrors: the sign of an unfolded det J."""
        return float(np.sign(np.linalg.det(self.affine[:3, :3])))

    def folding_percent(self, mask: np.ndarray | None = None) -> float:
        """% of working voxels (inside ``mask``) where the whole map folds."""
        return spatial.folding_percent(
            self.field.detach().cpu(), self.grid, mask, self.orientation()
        )

    def unfolded(self, passes: int) -> tuple[Alignment, int]:
        """This map smoothed locally where it folds (``spatial.unfold``); the passes it took."""
        field, done = spatial.unfold(self.field.detach(), self.grid, passes, self.orientation())
        return self.with_field(field), done

    def displacement_slabs(
        self, grid: Grid, deformable_only: bool = False
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """The whole map (or u alone) as a displacement at the voxels of ``grid``, slab by slab.

        Yields (z0, z1, (z1 - z0, H, W, 3) float64 LPS mm); the whole map is
        ``A(p + u(p)) - p`` and the deformable part ``u(p)``.
        """
        for z0, z1, points in slabs(grid):
            pts = torch.as_tensor(points)
            if deformable_only:
                values = self.deformable_at(pts).numpy()
            else:
                values = self.map_points(points) - points
            yield z0, z1, values.reshape(z1 - z0, *grid.shape[1:], 3)

    def displacement_on(self, grid: Grid, deformable_only: bool = False, dtype=np.float64):
        """The whole map (or u alone) at every voxel of ``grid``: (z, y, x, 3) LPS mm."""
        out = np.empty((*grid.shape, 3), dtype=dtype)
        for z0, z1, values in self.displacement_slabs(grid, deformable_only):
            out[z0:z1] = values
        return out

    # SimpleITK at the edge: imported only when a caller asks for an ITK transform.
    def affine_transform(self):
        """The affine alone as a SimpleITK AffineTransform (fixed -> moving)."""
        import SimpleITK as sitk

        return sitk.AffineTransform(
            self.affine[:3, :3].ravel().tolist(), self.affine[:3, 3].tolist()
        )

    def displacement_image(self, grid: Grid, deformable_only: bool = False, dtype=np.float64):
        """The whole map (or u alone) as a SimpleITK vector image on ``grid`` (ITK's layout)."""
        import SimpleITK as sitk

        values = self.displacement_on(grid, deformable_only, dtype)
        return grid.apply_to(sitk.GetImageFromArray(values, isVector=True))

    def sitk_transform(self, grid: Grid, dtype=np.float64):
        """The whole map as a SimpleITK DisplacementFieldTransform sampled on ``grid``."""
        import SimpleITK as sitk

        # ITK's displacement transform holds doubles: a float32 field is rounded, then widened.
        image = self.displacement_image(grid, dtype=dtype)
        return sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))
