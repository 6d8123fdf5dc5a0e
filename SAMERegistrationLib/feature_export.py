"""The descriptors of a registration's two images, kept for a later point-match search.

The registration worker writes them (``feature_maps.npz``: the body voxels of each feature grid,
their descriptors in float16 and the grid geometry); a viewer such as the Slicer module then finds
the match of any moving point with numpy alone, without PyTorch in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURE_MAPS_NAME = "feature_maps.npz"
MATCH_BLOCK = 65536  # stored voxels compared at once in match_point


@dataclass(frozen=True)
class StoredFeatures:
    """One image's descriptors at its body voxels, on its feature grid (LPS mm)."""

    index_zyx: np.ndarray  # (N, 3) int32, body voxels of the feature grid
    descriptors: np.ndarray  # (N, C) float16, SAME's matching descriptor (dot in [-1, 1])
    index_to_lps: np.ndarray  # (4, 4) voxel index (x, y, z) -> LPS mm
    shape: tuple[int, int, int]  # (z, y, x) of the feature grid

    def positions(self) -> np.ndarray:
        """LPS mm of every stored voxel, (N, 3)."""
        xyz = self.index_zyx[:, ::-1].astype(np.float64)
        return xyz @ self.index_to_lps[:3, :3].T + self.index_to_lps[:3, 3]

    def descriptor_at(self, point_lps: np.ndarray) -> np.ndarray | None:
        """The descriptor of the feature voxel nearest to a point; None outside the body."""
        to_index = np.linalg.inv(self.index_to_lps)
        xyz = np.rint(to_index[:3, :3] @ np.asarray(point_lps, dtype=np.float64) + to_index[:3, 3])
        zyx = xyz.astype(np.int64)[::-1]
        hit = np.flatnonzero(np.all(self.index_zyx == zyx, axis=1))
        return self.descriptors[hit[0]] if hit.size else None


def _stored(maps) -> dict[str, np.ndarray]:
    """A FeatureMaps (torch) as the arrays of StoredFeatures."""
    zyx = np.argwhere(maps.body).astype(np.int32)
    descriptor = maps.descriptor()[0].detach().to("cpu")  # (C, D, H, W)
    picked = descriptor[:, zyx[:, 0], zyx[:, 1], zyx[:, 2]].T.contiguous()
    return {
        "index_zyx": zyx,
        "descriptors": picked.numpy().astype(np.float16),
        "index_to_lps": maps.grid.index_to_physical_matrix(),
        "shape": np.array(maps.grid.shape, dtype=np.int64),
    }


def write_feature_maps(result, path: Path) -> None:
    """Write the fixed and moving descriptors of a RegistrationResult to ``path`` (.npz)."""
    if result.fixed_features is None or result.moving_features is None:
        raise ValueError("The registration result holds no feature maps to write.")
    arrays = {}
    for side, maps in (("fixed", result.fixed_features), ("moving", result.moving_features)):
        arrays.update({f"{side}_{key}": value for key, value in _stored(maps).items()})
    with open(path, "wb") as handle:
        np.savez(handle, features=np.array(result.features), **arrays)


def read_feature_maps(path: str | Path) -> tuple[StoredFeatures, StoredFeatures, str]:
    """Fixed and moving StoredFeatures and the feature type ("sam" or "mind") from an .npz."""
    with np.load(path) as data:
        sides = [
            StoredFeatures(
                data[f"{side}_index_zyx"],
                data[f"{side}_descriptors"],
                data[f"{side}_index_to_lps"],
                tuple(int(n) for n in data[f"{side}_shape"]),
            )
            for side in ("fixed", "moving")
        ]
        return sides[0], sides[1], str(data["features"])


def match_point(
    fixed: StoredFeatures,
    moving: StoredFeatures,
    moving_lps: np.ndarray,
    expected_lps: np.ndarray | None = None,
    radius_mm: float = 10.0,
) -> tuple[np.ndarray, float] | None:
    """Best fixed body voxel (LPS mm) for the descriptor at a moving point, and its similarity.

    With ``expected_lps`` only fixed voxels within ``radius_mm`` of it are searched. None when the
    point lies outside the moving body or no fixed body voxel is near enough.
    """
    query = moving.descriptor_at(moving_lps)
    if query is None or len(fixed.descriptors) == 0:
        return None
    positions = fixed.positions()
    keys = fixed.descriptors
    if expected_lps is not None:
        near = np.linalg.norm(positions - np.asarray(expected_lps), axis=1) <= radius_mm
        if not near.any():
            return None
        positions, keys = positions[near], keys[near]
    # In blocks, so that the float32 copy of the keys stays small (SAM has 256 channels).
    query = query.astype(np.float32)
    similarity = np.concatenate(
        [
            keys[i : i + MATCH_BLOCK].astype(np.float32) @ query
            for i in range(0, len(keys), MATCH_BLOCK)
        ]
    )
    best = int(np.argmax(similarity))
    return positions[best], float(similarity[best])
