"""Matching on identical images: every stable match is the point itself, with similarity 1."""

import numpy as np
import pytest
import SimpleITK as sitk

from SAMERegistrationLib.config import MatchingConfig
from SAMERegistrationLib.features.mind import MindExtractor
from SAMERegistrationLib.image import to_working_grid
from SAMERegistrationLib.matching import find_matches
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
