"""Synthetic working-grid pairs for the stage tests, built with numpy alone."""

from __future__ import annotations

import numpy as np
import torch

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.features import MindExtractor
from SAMERegistrationLib.features.base import FeatureMaps
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.matching import Matches
from SAMERegistrationLib.working import WorkingImage

GRID = Grid((36, 40, 44), (2.0, 2.0, 2.0), (-40.0, -30.0, 10.0))


def textured_body(grid: Grid = GRID, seed: int = 0) -> WorkingImage:
    """An ellipsoidal body with a few organs and smooth texture, in HU."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in grid.shape), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 + (z / 0.9) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)
    for cx, cy, cz, r, v in [(-0.3, 0.1, 0.2, 0.25, 200.0), (0.35, -0.2, -0.1, 0.2, -300.0),
                             (0.0, 0.4, -0.4, 0.15, 600.0), (0.1, -0.35, 0.45, 0.18, 120.0)]:  # fmt: skip
        hu[((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r * r) & body] = v
    noise = torch.as_tensor(rng.normal(0, 1, grid.shape), dtype=torch.float32)[None, None]
    texture = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)[0, 0].numpy()
    hu = hu + np.where(body, 60.0 * texture / texture.std(), 0.0)
    return WorkingImage(hu.astype(np.float32), body, grid)


def shifted(image: WorkingImage, shift_mm) -> WorkingImage:
    """The same scan placed ``shift_mm`` further along (x, y, z): fixed p is moving p + shift."""
    origin = tuple(np.array(image.grid.origin) + np.asarray(shift_mm, dtype=float))
    grid = Grid(image.grid.shape, image.grid.spacing, origin, image.grid.direction)
    return WorkingImage(image.hu.copy(), image.body.copy(), grid)


def pulled_through(moving: WorkingImage, alignment: Alignment) -> WorkingImage:
    """The fixed scan whose true map to ``moving`` is ``alignment``: fixed(p) = moving(map(p))."""
    hu = alignment.pull(torch.as_tensor(moving.hu)[None, None], moving.grid)
    body = alignment.pull(torch.as_tensor(moving.body, dtype=torch.float32)[None, None],
                          moving.grid, mode="nearest")  # fmt: skip
    return WorkingImage(hu[0, 0].numpy(), body[0, 0].numpy() > 0.5, alignment.grid)


def mind_maps(*images: WorkingImage) -> list[FeatureMaps]:
    extractor = MindExtractor(torch.device("cpu"), fine=True)
    return [extractor.extract(image) for image in images]


def matches_through(mapping, count: int = 300, seed: int = 0, grid: Grid = GRID) -> Matches:
    """Exact correspondences ``fixed -> mapping(fixed)`` at random points inside ``grid``."""
    rng = np.random.default_rng(seed)
    index = rng.uniform(2, np.array(grid.size_xyz) - 3, size=(count, 3))
    fixed = grid.index_to_physical(index)
    return Matches(fixed, mapping(fixed), np.ones(count), queried=count, stable=count)
