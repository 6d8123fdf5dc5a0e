"""Training views for SAM: pairs of overlapping random-scale crops of one CT, with known correspondence.

Each view is an axis-aligned, identity-direction (LPS) grid of ``patch`` voxels at an isotropic
spacing of ``base_spacing_mm * s``, ``s`` drawn from ``scale_range``, resampled directly from the
original scan (one interpolation). Because every view is axis-aligned, its voxel centres are the
Cartesian product of three coordinate vectors: the view records them (``View.axes_mm``, LPS mm per
slice, row and column), so the physical point of any voxel, and hence which voxel of the other view
sits on the same anatomy, is known exactly. ``View.valid`` marks voxels whose centre lies inside
the scan (elsewhere the view is padded with air).

Scans are read from disk when a pair is drawn, one at a time; only each scan's body mask is kept,
bit-packed, in a small on-disk cache, because computing it is the slow part of a draw.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..features.sam_network import GLOBAL_STRIDE, LOCAL_STRIDE
from ..grid import Grid
from ..image import AIR_HU, BODY_THRESHOLD_HU, body_mask, check_ct, read_image, sam_intensity

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


@dataclass
class Scan:
    """A CT in HU with its body mask (both on the scan's own grid) and the body's bounding box."""

    name: str
    image: sitk.Image  # float32 HU
    body: sitk.Image  # uint8
    box_lo_mm: np.ndarray  # (x, y, z) LPS corner of the body's bounding box (voxel centres)
    box_hi_mm: np.ndarray


def scan_from_image(image: sitk.Image, name: str, body: np.ndarray | None = None) -> Scan:
    """Wrap a checked CT image; ``body`` (z, y, x) is computed when not given."""
    image = check_ct(image, name)
    hu = sitk.GetArrayViewFromImage(image)
    if float(hu.min()) >= BODY_THRESHOLD_HU:
        raise InputError(
            f"The {name} holds no air (no voxel below {BODY_THRESHOLD_HU:g} HU), so it is not a CT "
            "in Hounsfield units; it may be a label map or a mask. Remove it from the training scans "
            "(for example with --exclude-pattern '*_label*')."
        )
    if body is None:
        body = body_mask(np.asarray(hu))
    if not body.any():
        raise InputError(
            f"No body (voxels above {BODY_THRESHOLD_HU:g} HU) was found in the {name}. Training "
            "expects CT in Hounsfield units; check the image or remove it from the training scans."
        )
    body_image = sitk.GetImageFromArray(body.astype(np.uint8))
    body_image.CopyInformation(image)
    nonzero = np.nonzero(body)
    lo = [int(ax.min()) for ax in nonzero]
    hi = [int(ax.max()) for ax in nonzero]
    corners_zyx = np.array(
        [[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
    )
    corners = Grid.from_sitk(image).index_to_physical(corners_zyx[:, ::-1])
    return Scan(name, image, body_image, corners.min(axis=0), corners.max(axis=0))


def load_scan(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> Scan:
    """Read one training scan; its body mask comes from ``cache_dir`` when computed before."""
    path = Path(path)
    name = f"training scan '{path}'"
    image = read_image(path, "training scan")
    cache = _cache_file(path, cache_dir) if cache_dir is not None else None
    body = _read_cached_body(cache, image) if cache is not None else None
    scan = scan_from_image(image, name, body)
    if cache is not None and body is None:
        _write_cached_body(cache, sitk.GetArrayViewFromImage(scan.body).astype(bool))
    return scan


def _cache_file(path: Path, cache_dir: str | os.PathLike[str]) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return Path(cache_dir) / f"body_{hashlib.sha1(key).hexdigest()[:20]}.npz"


def _read_cached_body(cache: Path, image: sitk.Image) -> np.ndarray | None:
    """The cached mask, or None when absent or unusable (it is then recomputed)."""
    shape = image.GetSize()[::-1]
    try:
        with np.load(cache, allow_pickle=False) as data:
            if tuple(data["shape"]) != shape:
                return None
            bits = np.unpackbits(data["bits"], count=int(np.prod(shape)))
    except (OSError, ValueError, KeyError):
        return None
    return bits.reshape(shape).astype(bool)


def _write_cached_body(cache: Path, body: np.ndarray) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, shape=np.array(body.shape), bits=np.packbits(body.ravel()))
    os.replace(partial, cache)


def draw_pair_geometry(
    rng: np.random.Generator, scan: Scan, config: CropConfig
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


def render_view(
    scan: Scan,
    geometry: ViewGeometry,
    rng: np.random.Generator | None = None,
    noise_std: float = 0.0,
    intensity_scale: float = 0.0,
    intensity_shift_hu: float = 0.0,
    body_only: bool = False,
) -> View:
    """Resample the scan onto the view (linear HU, nearest body) and scale it for SAM.

    With ``rng``, the HU are jittered as ``CropConfig`` describes before the scaling, and noise is
    added after it. With ``body_only``, voxels outside the body are not valid."""
    grid = geometry.grid()
    reference = grid.reference_image()
    hu = sitk.GetArrayFromImage(
        sitk.Resample(scan.image, reference, sitk.Transform(), sitk.sitkLinear, AIR_HU)
    )
    body = sitk.GetArrayFromImage(
        sitk.Resample(scan.body, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    ).astype(bool)
    points = grid.voxel_centres().reshape(-1, 3)
    valid = Grid.from_sitk(scan.image).contains(points, margin_voxels=0.5).reshape(grid.shape)
    if body_only:
        valid &= body
    image = sam_view_intensity(hu, body, rng, noise_std, intensity_scale, intensity_shift_hu)
    return View(image, geometry.axes_mm(), valid)


def sam_view_intensity(
    hu: np.ndarray,
    body: np.ndarray,
    rng: np.random.Generator | None,
    noise_std: float,
    intensity_scale: float,
    intensity_shift_hu: float,
) -> np.ndarray:
    """A view's SAM input from its HU and body mask, with the jitter and noise of ``render_view``."""
    if rng is not None and (intensity_scale > 0 or intensity_shift_hu > 0):
        gain = rng.uniform(1.0 - intensity_scale, 1.0 + intensity_scale)
        hu = hu * np.float32(gain) + np.float32(
            rng.uniform(-intensity_shift_hu, intensity_shift_hu)
        )
    image = sam_intensity(hu, body)
    if rng is not None and noise_std > 0:
        image += rng.normal(0.0, rng.uniform(0.0, noise_std), image.shape).astype(np.float32)
    return image


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


def collate_views(
    views: Sequence[View], names: list[str], cross_patient: list[bool] | None = None
) -> PairBatch:
    """Stack views (pairs consecutive) with their local and global correspondence targets."""
    local = [
        feature_targets(
            v if v.reliable is None else View(v.image, v.axes_mm, v.valid & v.reliable),
            LOCAL_STRIDE,
            LOCAL_OFFSET,
        )
        for v in views
    ]
    global_ = [feature_targets(v, GLOBAL_STRIDE, GLOBAL_OFFSET) for v in views]

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


class CropPairDataset(torch.utils.data.Dataset):
    """Item ``i`` is the whole batch of iteration ``i``, drawn from a generator seeded by (seed, i).

    Keying the randomness by iteration makes the data stream independent of how many loader
    processes run and lets a resumed run see exactly the batches it would have seen. Each item
    reads its ``pairs`` scans from disk (different scans when there are enough).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        config: CropConfig,
        pairs: int,
        seed: int,
        cache_dir: str | os.PathLike[str] | None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.config = config
        self.pairs = pairs
        self.seed = seed
        self.cache_dir = cache_dir

    def __getitem__(self, iteration: int) -> PairBatch:
        rng = np.random.default_rng([self.seed, iteration])
        chosen = rng.choice(len(self.paths), self.pairs, replace=self.pairs > len(self.paths))
        views, names = [], []
        for index in chosen:
            scan = load_scan(self.paths[index], self.cache_dir)
            for geometry in draw_pair_geometry(rng, scan, self.config):
                views.append(
                    render_view(
                        scan,
                        geometry,
                        rng,
                        self.config.noise_std,
                        self.config.intensity_scale,
                        self.config.intensity_shift_hu,
                        self.config.body_only,
                    )
                )
            names.append(scan.name)
        return collate_views(views, names)
