"""Matching on identical images: every stable match is the point itself, with similarity 1."""

import numpy as np
import pytest
import SimpleITK as sitk

from SAMERegistrationLib.config import MatchingConfig
from SAMERegistrationLib.features.mind import MindExtractor
from SAMERegistrationLib.image import to_working_grid
from SAMERegistrationLib.matching import find_matches, nearest_matches
from SAMERegistrationLib.synthetic import make_phantom


@pytest.mark.parametrize("radius", [None, 0.0, 20.0])  # 0 and None: whole image (SAM's default)
def test_identical_images_match_themselves(radius):
    image, _ = make_phantom(size_xyz=(64, 56, 40), spacing=3.0)
    maps = MindExtractor().extract(to_working_grid(sitk.Cast(image, sitk.sitkFloat32), 2.0))
    matches = find_matches(maps, maps, MatchingConfig(similarity_threshold=0.0), radius_mm=radius)
    assert len(matches) > 0.5 * matches.queried
    # Sub-voxel refinement may move a peak by up to half a 4 mm feature voxel per axis.
    offset = np.abs(matches.fixed - matches.moving)
    assert offset.max() <= 2.0 + 1e-6 and offset.mean() < 0.5
    np.testing.assert_allclose(matches.similarity, 1.0, atol=1e-5)


def test_nearest_matches_recover_a_known_shift():
    """One-way nearest matches of a shifted copy land on the shift (known answer)."""
    image, _ = make_phantom(size_xyz=(64, 56, 40), spacing=3.0)
    fixed = sitk.Cast(image, sitk.sitkFloat32)
    moving = sitk.Image(fixed)
    moving.SetOrigin((12.0, -8.0, 4.0))  # the same voxels, 12/-8/4 mm away (LPS x, y, z)
    extractor = MindExtractor()
    fixed_maps = extractor.extract(to_working_grid(fixed, 2.0))
    moving_maps = extractor.extract(to_working_grid(moving, 2.0))
    queries = np.argwhere(moving_maps.body)[::7]
    prior = np.eye(4)
    prior[:3, 3] = (12.0, -8.0, 4.0)  # fixed -> moving
    found = nearest_matches(fixed_maps, moving_maps, queries, prior, radius_mm=10.0)
    assert len(found) == len(queries) and found.queried == len(queries)
    error = np.linalg.norm(found.fixed + prior[:3, 3] - found.moving, axis=1)
    assert np.median(error) < 1.0 and np.mean(error < 4.0) > 0.9
