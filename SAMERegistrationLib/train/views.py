"""Training views for SAM without any image I/O: where two crops of a scan lie, and their batches.

Every view is an axis-aligned, identity-direction (LPS) grid, so its voxel centres are the Cartesian
product of three coordinate vectors (``View.axes_mm``) and the voxel of the other view on the same
anatomy is known exactly. Only numpy and torch are needed here, so a trainer that renders views
itself (on a GPU, from packed arrays) shares the geometry, the batch layout and the loss targets
with ``crops``, which renders them from scan files with SimpleITK.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..features.sam_network import GLOBAL_STRIDE, LOCAL_STRIDE
from ..grid import Grid

#: Where voxel 0 of the local / global map sits on the input, in input voxels (z, y, x); voxel i
#: sits at ``stride * i + offset`` (see the ``sam_network`` module docstring).
LOCAL_OFFSET = (0.5, 0.0, 0.0)
GLOBAL_OFFSET = (0.5, 0.0, 0.0)


@dataclass(frozen=True)
class CropConfig:
    """How training views are drawn (defaults: same-code-facts.md section 3)."""

    patch: tuple[int, int, int] = (32, 96, 96)  # (z, y, x) voxels of every view
    base_spacing_mm: float = 2.0  # view spacing at scale 1
    scale_range: tuple[float, float] = (0.8, 1.2)
    overlap_probability: float = 0.8  # per axis; otherwise the views are (nearly) disjoint on it
    min_overlap_voxels: tuple[int, int, int] = (5, 20, 20)  # (z, y, x), in base-spacing voxels
    overlap_margin_voxels: int = 2  # the overlap stays this much below the smaller view
    noise_std: float = 0.001  # Gaussian noise of std U(0, noise_std) on the SAM intensities
    # Per view, HU * U(1 - a, 1 + a) + U(-b, b): scanners and patients differ in contrast and
    # calibration, and the same anatomy should embed alike. Off in SAM (0, 0).
    intensity_scale: float = 0.0  # a
    intensity_shift_hu: float = 0.0  # b
    # Only voxels inside the body are queries, keys or negatives (air carries no anatomy).
    body_only: bool = False


@dataclass(frozen=True)
class ViewGeometry:
    """An axis-aligned LPS grid: ``origin_mm`` (x, y, z) is the centre of voxel (0, 0, 0)."""

    origin_mm: tuple[float, float, float]
    spacing_mm: float
    shape: tuple[int, int, int]  # (z, y, x)

    def grid(self) -> Grid:
        return Grid(self.shape, (self.spacing_mm,) * 3, self.origin_mm, np.eye(3))

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS z of every slice, y of every row, x of every column."""
        origin_zyx = self.origin_mm[::-1]
        return tuple(  # type: ignore[return-value]
            origin_zyx[a] + self.spacing_mm * np.arange(self.shape[a], dtype=np.float64)
            for a in range(3)
        )


@dataclass
class View:
    """One training view: SAM input intensities and the physical position of every voxel."""

    image: np.ndarray  # float32 (z, y, x)
    axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray]  # LPS z per slice, y per row, x per column
    valid: np.ndarray  # bool (z, y, x): voxel centre inside the scan
    # Where the local loss may use the voxel (None: wherever valid); a view drawn through a
    # registration map is trusted only where the map is (cross_patient).
    reliable: np.ndarray | None = None


class BodyBox(Protocol):
    """The body's bounding box of a scan: LPS (x, y, z) corners of its voxel centres, mm."""

    box_lo_mm: np.ndarray
    box_hi_mm: np.ndarray


def draw_pair_geometry(
    rng: np.random.Generator, scan: BodyBox, config: CropConfig
) -> tuple[ViewGeometry, ViewGeometry]:
    """Two views of random scale placed around the body, overlapping per axis with some probability.

    Per axis, with probability ``overlap_probability`` the views overlap by a random length between
    ``min_overlap_voxels`` (at base spacing) and the smaller view minus ``overlap_margin_voxels``;
    otherwise they are placed apart, from touching to spanning the body box. Both view centres lie
    in the body box whenever the box is long enough for the chosen distance, else they straddle
    its centre.
    """
    scales = rng.uniform(*config.scale_range, size=2)
    spacings = config.base_spacing_mm * scales
    centres = np.zeros((2, 3))
    for axis_xyz in range(3):
        axis_zyx = 2 - axis_xyz
        n = config.patch[axis_zyx]
        lo, hi = float(scan.box_lo_mm[axis_xyz]), float(scan.box_hi_mm[axis_xyz])
        extents = n * spacings
        touching = extents.sum() / 2  # distance between the centres at which the views touch
        if rng.random() < config.overlap_probability:
            most = extents.min() - config.overlap_margin_voxels * config.base_spacing_mm
            least = min(config.min_overlap_voxels[axis_zyx] * config.base_spacing_mm, most)
            distance = touching - rng.uniform(least, most)
        else:
            distance = rng.uniform(touching, max(hi - lo, touching))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        if distance <= hi - lo:
            first = rng.uniform(lo + max(0.0, -sign * distance), hi - max(0.0, sign * distance))
        else:
            first = (lo + hi) / 2 - sign * distance / 2
        centres[:, axis_xyz] = (first, first + sign * distance)
    geometries = []
    for centre, spacing in zip(centres, spacings):
        half = (np.array(config.patch[::-1]) - 1) / 2 * spacing
        geometries.append(ViewGeometry(tuple(centre - half), float(spacing), config.patch))
    return geometries[0], geometries[1]


def feature_targets(
    view: View, stride: Sequence[int], offset: Sequence[float]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Physical coordinates and validity of a network output map's voxels on this view.

    Output voxel i along an axis sits at input position ``stride * i + offset``; its coordinate is
    interpolated in the view's (uniform) coordinate vector, and it is valid when the input voxels
    on both sides of that position are.
    """
    axes = []
    lower, upper = [], []
    for a in range(3):
        n_in = view.valid.shape[a]
        n_out = -(-n_in // stride[a])
        position = stride[a] * np.arange(n_out) + offset[a]
        axes.append(np.interp(position, np.arange(n_in), view.axes_mm[a]))
        lower.append(np.clip(np.floor(position).astype(int), 0, n_in - 1))
        upper.append(np.clip(np.ceil(position).astype(int), 0, n_in - 1))
    valid = view.valid[np.ix_(*lower)] & view.valid[np.ix_(*upper)]
    return (axes[0], axes[1], axes[2]), valid


@dataclass
class PairBatch:
    """A training batch: views 2b and 2b + 1 come from pair b, pairs from different scans."""

    images: torch.Tensor  # (2B, 1, D, H, W) float32
    local_axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (2B, d), (2B, h), (2B, w) mm
    local_valid: torch.Tensor  # (2B, d, h, w) bool
    global_axes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    global_valid: torch.Tensor
    names: list[str]  # scan of each pair
    # Per pair: True when its views come from two patients through a registration map.
    cross_patient: list[bool] = field(default_factory=list)

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.images.to(device),
            tuple(a.to(device) for a in self.local_axes),  # type: ignore[arg-type]
            self.local_valid.to(device),
            tuple(a.to(device) for a in self.global_axes),  # type: ignore[arg-type]
            self.global_valid.to(device),
            self.names,
            self.cross_patient,
        )


def view_targets(views: Sequence[View]) -> tuple[list, list]:
    """Each view's local targets (only where it is ``reliable``) and global targets."""
    local = [
        feature_targets(
            v if v.reliable is None else View(v.image, v.axes_mm, v.valid & v.reliable),
            LOCAL_STRIDE,
            LOCAL_OFFSET,
        )
        for v in views
    ]
    return local, [feature_targets(v, GLOBAL_STRIDE, GLOBAL_OFFSET) for v in views]


def collate_views(
    views: Sequence[View], names: list[str], cross_patient: list[bool] | None = None
) -> PairBatch:
    """Stack views (pairs consecutive) with their local and global correspondence targets."""
    local, global_ = view_targets(views)

    def axes(targets: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(  # type: ignore[return-value]
            torch.from_numpy(np.stack([t[0][a] for t in targets]).astype(np.float32))
            for a in range(3)
        )

    return PairBatch(
        images=torch.from_numpy(np.stack([v.image for v in views])[:, None]),
        local_axes=axes(local),
        local_valid=torch.from_numpy(np.stack([t[1] for t in local])),
        global_axes=axes(global_),
        global_valid=torch.from_numpy(np.stack([t[1] for t in global_])),
        names=names,
        cross_patient=cross_patient or [False] * len(names),
    )
