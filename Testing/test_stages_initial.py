"""stages/initial.run: the starting translation, found by search or body centroids, is the known
placement of a scan relative to a copy of it."""

import numpy as np
import pytest
from _stage_pairs import GRID, mind_maps, shifted, textured_body
from conftest import torch_threads

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.stages import initial

# A multiple of the search step (every 2nd voxel of the 4 mm feature grid: 8 mm).
SHIFT = np.array([16.0, -8.0, 24.0])


@pytest.fixture(scope="module")
def maps():
    with torch_threads(1):
        fixed = textured_body()
        return mind_maps(fixed, shifted(fixed, SHIFT))


@pytest.mark.parametrize("mode", ["search", "centroid"])
def test_run_finds_the_known_translation(maps, mode) -> None:
    config = RegistrationConfig(features="mind", initialisation=mode)
    start = Alignment.identity(GRID)
    aligned, info = initial.run(*maps, start, config)
    np.testing.assert_allclose(aligned.affine[:3, 3], SHIFT, atol=1e-6)
    np.testing.assert_array_equal(aligned.affine[:3, :3], np.eye(3))
    assert info["method"] == mode and info["translation_mm"] == pytest.approx(SHIFT.tolist())
    assert aligned.field is start.field  # the field is kept


def test_identity_keeps_the_scanner_coordinates(maps) -> None:
    config = RegistrationConfig(features="mind", initialisation="identity")
    aligned, info = initial.run(*maps, Alignment.identity(GRID), config)
    np.testing.assert_array_equal(aligned.affine, np.eye(4))
    assert info == {"method": "identity"}
