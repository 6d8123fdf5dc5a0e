"""Image geometry: voxel <-> physical (LPS mm) conversions, as ITK defines them.

Conventions used everywhere in the library:
- arrays are indexed (z, y, x), like ``SimpleITK.GetArrayFromImage``;
- voxel indices and physical points are (N, 3) arrays in (x, y, z) order;
- physical space is LPS millimetres: ``point = origin + direction @ (spacing * index)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

SLAB_VOXELS = 4_000_000  # voxels per block when a whole image grid is visited


@dataclass(frozen=True)
class Grid:
    """The sampling lattice of a 3-D image.

    ``shape`` is (z, y, x); ``spacing`` and ``origin`` are (x, y, z); ``direction`` is the 3x3 matrix
    whose columns are the physical directions of the x, y and z index axes.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", np.asarray(self.direction, dtype=np.float64))

    # SimpleITK is imported by the methods that need it, so that the core runs without it.
    @classmethod
    def from_sitk(cls, image) -> Grid:
        size = image.GetSize()
        return cls(
            shape=(size[2], size[1], size[0]),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        return (self.shape[2], self.shape[1], self.shape[0])

    @property
    def is_axis_aligned(self) -> bool:
        return bool(np.allclose(self.direction, np.eye(3), atol=1e-6))

    def index_to_physical_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix from continuous (x, y, z) index to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_physical(self, index_xyz: np.ndarray) -> np.ndarray:
        index_xyz = np.asarray(index_xyz, dtype=np.float64)
        m = self.index_to_physical_matrix()
        return index_xyz @ m[:3, :3].T + m[:3, 3]

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        m = np.linalg.inv(self.index_to_physical_matrix())
        return points @ m[:3, :3].T + m[:3, 3]

    def corners(self) -> np.ndarray:
        """Physical positions of the 8 corner voxel centres, (8, 3)."""
        hi = np.array(self.size_xyz) - 1
        idx = np.array([[i, j, k] for i in (0, hi[0]) for j in (0, hi[1]) for k in (0, hi[2])])
        return self.index_to_physical(idx)

    def voxel_centres(self) -> np.ndarray:
        """Physical position of every voxel, shape (z, y, x, 3), float64."""
        z, y, x = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        idx = np.stack([x, y, z], axis=-1).reshape(-1, 3)
        return self.index_to_physical(idx).reshape(*self.shape, 3)

    def contains(self, points: np.ndarray, margin_voxels: float = 0.0) -> np.ndarray:
        """True for points inside the hull of voxel centres (plus a margin in voxels)."""
        idx = self.physical_to_index(points)
        hi = np.array(self.size_xyz) - 1
        return np.all((idx >= -margin_voxels) & (idx <= hi + margin_voxels), axis=1)

    def reference_image(self):
        """An empty SimpleITK image with this geometry, for resampling onto it."""
        import SimpleITK as sitk

        ref = sitk.Image(list(self.size_xyz), sitk.sitkUInt8)
        self.apply_to(ref)
        return ref

    def apply_to(self, image):
        """Give a SimpleITK image this grid's spacing, origin and direction."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.ravel()))
        return image

    def matches(self, other: Grid, tolerance: float = 1e-3) -> bool:
        """Same lattice within ``tolerance`` (mm for origins, relative for spacings)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance * max(self.spacing))
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def describe(self) -> str:
        return (
            f"size {'x'.join(map(str, self.size_xyz))}, spacing "
            f"{'x'.join(f'{s:.3g}' for s in self.spacing)} mm, origin "
            f"({', '.join(f'{o:.1f}' for o in self.origin)})"
        )

    def crop(self, start_zyx: tuple[int, int, int], stop_zyx: tuple[int, int, int]) -> Grid:
        """The sub-grid of voxels [start, stop) along each (z, y, x) axis."""
        start_xyz = np.array(start_zyx[::-1], dtype=np.float64)
        origin = self.index_to_physical(start_xyz[None])[0]
        shape = tuple(int(b - a) for a, b in zip(start_zyx, stop_zyx))
        return Grid(shape, self.spacing, tuple(origin), self.direction)

    def downsampled(self, factor: int) -> Grid:
        """Every ``factor``-th voxel: voxel i of the result sits on voxel factor*i of this grid."""
        shape = tuple(-(-n // factor) for n in self.shape)
        spacing = tuple(s * factor for s in self.spacing)
        return Grid(shape, spacing, self.origin, self.direction)

    def to_dict(self) -> dict:
        return {
            "size_xyz": list(self.size_xyz),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.ravel().tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Grid:
        """The grid ``to_dict`` described."""
        direction = np.array(data["direction"], dtype=np.float64).reshape(3, 3)
        return cls(tuple(data["size_xyz"][::-1]), data["spacing"], data["origin"], direction)


def axis_aligned_grid_covering(points: np.ndarray, spacing: float) -> Grid:
    """The identity-direction grid of isotropic ``spacing`` whose voxel centres cover ``points``."""
    lo = points.min(axis=0)
    hi = points.max(axis=0)
    size_xyz = np.ceil((hi - lo) / spacing - 1e-6).astype(int) + 1
    return Grid(tuple(size_xyz[::-1]), (spacing,) * 3, tuple(lo), np.eye(3))


def slab_bounds(shape: tuple[int, ...], voxels: int | None = None) -> Iterator[tuple[int, int]]:
    """(z0, z1) of consecutive slabs of whole z-slices of a (..., z, y, x) ``shape``, each of
    about ``voxels`` voxels (default ``SLAB_VOXELS``; at least one slice), covering every slice
    once."""
    depth, rows, cols = shape[-3:]
    step = max(1, (voxels or SLAB_VOXELS) // max(rows * cols, 1))
    for z0 in range(0, depth, step):
        yield z0, min(z0 + step, depth)


def slabs(
    grid: Grid, voxels: int | None = None, halo: int = 0
) -> Iterator[tuple[int, int, np.ndarray]]:
    """The voxel centres of ``grid`` in slabs of whole z-slices, so that memory stays bounded.

    Yields (z0, z1, points): points are the (N, 3) LPS mm centres of slices z0..z1-1 in array
    order (z, y, x), as ``reshape(-1, H, W, 3)`` restores them. With ``halo``, they also cover up
    to ``halo`` neighbouring slices on each side (those inside the grid, so they start at slice
    max(z0 - halo, 0)), e.g. for gradients that are whole at the slab's faces.
    """
    depth = grid.shape[0]
    y, x = np.meshgrid(np.arange(grid.shape[1]), np.arange(grid.shape[2]), indexing="ij")
    for z0, z1 in slab_bounds(grid.shape, voxels):
        z = np.arange(max(z0 - halo, 0), min(z1 + halo, depth))
        idx = np.stack(np.broadcast_arrays(x[None], y[None], z[:, None, None]), axis=-1)
        yield z0, z1, grid.index_to_physical(idx.reshape(-1, 3))
