"""Matching: identical images match themselves; the ratio test, the shared region and the
model's calibrated threshold, each against a known answer."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.config import MatchingConfig, RegistrationConfig
from SAMERegistrationLib.errors import ConfigError
from SAMERegistrationLib.features.base import FeatureMaps
from SAMERegistrationLib.features.mind import MindExtractor
from SAMERegistrationLib.features.sam import DEFAULT_RECORD, DEFAULT_WEIGHTS
from SAMERegistrationLib.features.sam_network import load_sam_checkpoint
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.image import to_working_grid
from SAMERegistrationLib.matching import (
    find_matches,
    model_similarity_threshold,
    nearest_matches,
    with_model_threshold,
)
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


def _synthetic_maps(local: np.ndarray, global_: np.ndarray) -> FeatureMaps:
    """Feature maps on an 8^3 grid of 4 mm voxels from (C, 8, 8, 8) arrays, made unit length."""
    unit = [
        torch.nn.functional.normalize(torch.as_tensor(a)[None], dim=1) for a in (local, global_)
    ]
    grid = Grid((8, 8, 8), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    return FeatureMaps(unit[0].float(), unit[1].float(), grid, np.ones((8, 8, 8), dtype=bool))


def test_ratio_test_drops_an_ambiguous_match_and_keeps_unique_ones():
    """Fixed voxel B (35 mm from A) repeats A's pattern: the moving A then has two equally good
    matches and the ratio test drops it; unique matches (s1 ~ 0.9, s2 ~ 0.5) stay."""
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=(2, 16, 8, 8, 8))
    pattern /= np.linalg.norm(pattern, axis=1, keepdims=True)

    def noisy(scale: float) -> np.ndarray:  # a copy with noise (normalised later)
        return pattern + rng.normal(scale=scale, size=pattern.shape)

    a, b = (slice(None), slice(None), 1, 1, 1), (slice(None), slice(None), 6, 6, 6)
    fixed_local, fixed_global = noisy(0.05)
    moving_local, moving_global = noisy(0.12)
    fixed_local[b[1:]], fixed_global[b[1:]] = noisy(0.05)[a]  # B: a second copy of A
    fixed = _synthetic_maps(fixed_local, fixed_global)
    moving = _synthetic_maps(moving_local, moving_global)
    a_mm = np.array([4.0, 4.0, 4.0])  # voxel (1, 1, 1): x, y, z = 4 mm

    def run(ratio_max: float):
        config = MatchingConfig(
            grid_stride=2, similarity_threshold=0.7, ratio_max=ratio_max, ratio_exclusion_mm=16.0
        )
        return find_matches(fixed, moving, config)

    plain, tested = run(1.0), run(0.8)
    assert plain.queried == tested.queried == 512
    assert np.any(np.all(plain.moving == a_mm, axis=1)), "without the ratio test A is matched"
    assert not np.any(np.all(tested.moving == a_mm, axis=1)), "the ambiguous match is dropped"
    assert len(tested) >= 0.95 * len(plain) and len(tested) > 450
    correct = np.linalg.norm(tested.fixed - tested.moving, axis=1) <= 2.0 + 1e-6
    assert correct.all()


def test_matching_keeps_to_the_region_both_scans_cover(openkbp):
    """One CT cropped to two overlapping fields of view (same physical space, so the true map is
    the identity): moving points beyond the fixed scan are not queried, so the match share stays
    that of the shared anatomy, and the matches are right."""
    ct = sitk.ReadImage(str(openkbp / "validation_pt_201_ct.nii.gz"))
    fixed, moving = ct[:, :, :80], ct[:, :, 40:]  # 40 shared slices, 48 more in the moving scan
    extractor = MindExtractor()
    fixed_maps = extractor.extract(to_working_grid(sitk.Cast(fixed, sitk.sitkFloat32), 2.0))
    moving_maps = extractor.extract(to_working_grid(sitk.Cast(moving, sitk.sitkFloat32), 2.0))
    settings = RegistrationConfig().resolved_for("mind").matching
    restricted = find_matches(fixed_maps, moving_maps, settings, np.eye(4), 20.0)
    settings.overlap_margin_mm = None
    everywhere = find_matches(fixed_maps, moving_maps, settings, np.eye(4), 20.0)
    assert restricted.outside > 0.3 * everywhere.queried and everywhere.outside == 0
    assert restricted.queried + restricted.outside == everywhere.queried
    share, diluted = (len(m) / m.queried for m in (restricted, everywhere))
    assert share > 1.5 * diluted and share >= settings.min_match_share * 2
    error = np.linalg.norm(restricted.fixed - restricted.moving, axis=1)
    assert np.median(error) < 3.0


def test_the_calibrated_threshold_comes_from_the_model_record(tmp_path):
    record = json.loads(DEFAULT_RECORD.read_text())
    calibrated = record["similarity_threshold"]
    assert model_similarity_threshold(DEFAULT_WEIGHTS) == calibrated
    config = with_model_threshold(RegistrationConfig(features="sam"), DEFAULT_WEIGHTS)
    assert config.resolved_for("sam").matching.similarity_threshold == calibrated
    chosen = RegistrationConfig().with_overrides({"matching.similarity_threshold": 0.5})
    assert with_model_threshold(chosen, DEFAULT_WEIGHTS).matching.similarity_threshold == 0.5

    # An official-layout checkpoint (state_dict only) has no record: SAME's 0.7 applies.
    official = tmp_path / "SAM.pth"
    torch.save({"state_dict": torch.load(DEFAULT_WEIGHTS)["state_dict"]}, official)
    assert load_sam_checkpoint(official).width == record["width"]
    assert model_similarity_threshold(official) is None
    config = with_model_threshold(RegistrationConfig(features="sam"), official)
    assert config.resolved_for("sam").matching.similarity_threshold == 0.7
    # A record that belongs to another file is not trusted.
    (tmp_path / "SAM.json").write_text(json.dumps({**record, "similarity_threshold": 0.3}))
    assert model_similarity_threshold(official) is None


@pytest.mark.parametrize(
    "key, value",
    [
        ("matching.ratio_max", 1.5),
        ("matching.ratio_max", 0.0),
        ("matching.ratio_max", [0.8]),
        ("matching.ratio_exclusion_mm", -1.0),
        ("matching.overlap_margin_mm", -5.0),
        ("affine.ransac_iterations", 10.5),
        ("affine.ransac_inlier_mm", -1.0),
        ("affine.min_scale", 1.2),
        ("affine.max_scale", 0.9),
    ],
)
def test_bad_matching_and_fit_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        RegistrationConfig().with_overrides({key: value})


def test_null_matching_settings_take_the_feature_defaults():
    sam = RegistrationConfig().resolved_for("sam")
    assert sam.matching.ratio_max == 0.8 and sam.matching.ratio_exclusion_mm == 16.0
    assert sam.affine.ransac_iterations > 0 and 10 <= sam.affine.ransac_inlier_mm <= 15
    mind = RegistrationConfig().resolved_for("mind")
    assert mind.matching.similarity_threshold == 0.7 and mind.matching.ratio_max == 1.0
    assert mind.affine.ransac_iterations == 0 and mind.affine.outlier_factor == 2.0
