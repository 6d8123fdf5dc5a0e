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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..grid import Grid
from ..image import BODY_THRESHOLD_HU, body_mask, check_ct, read_image
from ..working import AIR_HU, sam_intensity
from .views import (
    CropConfig,
    PairBatch,
    View,
    ViewGeometry,
    collate_views,
    draw_pair_geometry,
)


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
        rng, chosen = self._draw(iteration)
        views, names = [], []
        for index in chosen:
            scan = load_scan(self.paths[index], self.cache_dir)
            views += self._scan_views(scan, rng)
            names.append(scan.name)
        return collate_views(views, names)

    def _draw(self, iteration: int) -> tuple[np.random.Generator, np.ndarray]:
        """The generator of iteration ``iteration`` and the indices of its ``pairs`` scans."""
        rng = np.random.default_rng([self.seed, iteration])
        return rng, rng.choice(len(self.paths), self.pairs, replace=self.pairs > len(self.paths))

    def _scan_views(self, scan: Scan, rng: np.random.Generator) -> list[View]:
        """Two overlapping views of one scan."""
        return [self._render(scan, g, rng) for g in draw_pair_geometry(rng, scan, self.config)]

    def _render(self, scan: Scan, geometry: ViewGeometry, rng: np.random.Generator) -> View:
        c = self.config
        return render_view(
            scan, geometry, rng, c.noise_std, c.intensity_scale, c.intensity_shift_hu, c.body_only
        )
