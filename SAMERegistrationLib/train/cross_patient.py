"""Crop pairs across patients: one view of a fixed scan, one of a moving scan through a cached map.

Both views are laid out in the fixed scan's space (``draw_pair_geometry`` on the fixed scan). The
first view shows the fixed scan; the second shows the moving scan pulled through the registration
map ``p -> A (p + u(p))`` (``pair_maps``): its voxel at fixed-space point p holds the moving scan
at the map's image of p. The two views thus share one coordinate frame, and the same-scan
correspondence machinery (``sam_losses``) gives cross-patient positives wherever the map is right. The
global loss uses every valid voxel; the local loss only voxels where the map's local similarity
reaches ``min_similarity`` (``View.reliable``), since the map is a teacher with errors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..grid import Grid
from ..working import AIR_HU
from .crops import (
    CropConfig,
    CropPairDataset,
    PairBatch,
    Scan,
    View,
    ViewGeometry,
    collate_views,
    draw_pair_geometry,
    load_scan,
    sam_view_intensity,
)
from .pair_maps import PairMap, read_map, sample_on_grid


def render_through_map(
    moving: Scan,
    pair_map: PairMap,
    geometry: ViewGeometry,
    config: CropConfig,
    min_similarity: float,
    rng: np.random.Generator | None = None,
) -> View:
    """The moving scan on a fixed-space view, pulled through the map (linear HU, nearest body).

    Valid: the mapped point lies in the moving scan and the view point on the map's grid (and in
    the body with ``config.body_only``); reliable: the map's similarity there is at least
    ``min_similarity``."""
    points = geometry.grid().voxel_centres().reshape(-1, 3)
    source = pair_map.map_points(points)
    moving_grid = Grid.from_sitk(moving.image)
    hu_and_body = np.stack(
        [
            sitk.GetArrayViewFromImage(moving.image).astype(np.float32),
            sitk.GetArrayViewFromImage(moving.body).astype(np.float32),
        ]
    )
    hu, body = sample_on_grid(hu_and_body, moving_grid, source)
    inside = moving_grid.contains(source, margin_voxels=0.5)
    hu = np.where(inside, hu, AIR_HU).reshape(geometry.shape).astype(np.float32)
    body = (inside & (body >= 0.5)).reshape(geometry.shape)
    valid = (inside & pair_map.grid.contains(points, margin_voxels=0.5)).reshape(geometry.shape)
    if config.body_only:
        valid &= body
    reliable = (pair_map.similarity_at(points) >= min_similarity).reshape(geometry.shape)
    image = sam_view_intensity(
        hu, body, rng, config.noise_std, config.intensity_scale, config.intensity_shift_hu
    )
    return View(image, geometry.axes_mm(), valid, reliable)


class CrossPatientDataset(CropPairDataset):
    """Like ``CropPairDataset`` (item ``i`` is the batch of iteration ``i``, seeded by (seed, i)),
    but each pair is, with probability ``share``, a cross-patient pair through a random cached map.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        pair_files: Sequence[Path],
        config: CropConfig,
        pairs: int,
        seed: int,
        share: float,
        min_similarity: float,
        cache_dir: str | os.PathLike[str] | None,
    ) -> None:
        super().__init__(paths, config, pairs, seed, cache_dir)
        self.pair_files = list(pair_files)
        self.share = share
        self.min_similarity = min_similarity

    def __getitem__(self, iteration: int) -> PairBatch:
        rng, chosen = self._draw(iteration)
        views: list[View] = []
        names, cross = [], []
        for index in chosen:
            if rng.random() < self.share:
                pair_map = read_map(self.pair_files[rng.integers(len(self.pair_files))])
                fixed = load_scan(pair_map.fixed.path, self.cache_dir)
                moving = load_scan(pair_map.moving.path, self.cache_dir)
                first, second = draw_pair_geometry(rng, fixed, self.config)
                views.append(self._render(fixed, first, rng))
                views.append(
                    render_through_map(
                        moving, pair_map, second, self.config, self.min_similarity, rng
                    )
                )
                names.append(f"{fixed.name} <- {moving.name}")
                cross.append(True)
                continue
            scan = load_scan(self.paths[index], self.cache_dir)
            views += self._scan_views(scan, rng)
            names.append(scan.name)
            cross.append(False)
        return collate_views(views, names, cross)
