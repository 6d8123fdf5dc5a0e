"""Robust affine fit: known transforms recovered from matches with gross outliers; implausible
scales and reflections refused."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.matching import Matches
from SAMERegistrationLib.stages.affine import fit_affine
from SAMERegistrationLib.stages.robust_fit import affine_inliers, umeyama


def _known_affine(linear: np.ndarray, translation=(12.0, -30.0, 45.0)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = linear, translation
    return matrix


def _matches(truth: np.ndarray, outlier_share: float, seed: int = 0, noise_mm: float = 0.0):
    """300 fixed points in a 200 mm box mapped by ``truth``; a share replaced by random points."""
    rng = np.random.default_rng(seed)
    fixed = rng.uniform(-100, 100, size=(300, 3))
    moving = fixed @ truth[:3, :3].T + truth[:3, 3] + rng.normal(scale=noise_mm, size=fixed.shape)
    wrong = rng.permutation(300) < round(outlier_share * 300)
    moving[wrong] = rng.uniform(-150, 150, size=(int(wrong.sum()), 3))
    return Matches(fixed, moving, np.ones(300), queried=400, stable=350), wrong


def _worst_error_mm(matrix: np.ndarray, truth: np.ndarray) -> float:
    """Largest distance between the two maps over the corners of the 200 mm box."""
    corners = np.array(np.meshgrid(*[[-100.0, 100.0]] * 3)).reshape(3, -1).T
    diff = corners @ (matrix - truth)[:3, :3].T + (matrix - truth)[:3, 3]
    return float(np.linalg.norm(diff, axis=1).max())


def test_ransac_recovers_a_known_affine_despite_40_percent_outliers():
    linear = Rotation.from_euler("xyz", [8, -5, 12], degrees=True).as_matrix() @ np.diag(
        [1.1, 0.92, 1.05]
    )
    truth = _known_affine(linear)
    matches, wrong = _matches(truth, 0.4)
    config = RegistrationConfig().resolved_for("sam")  # SAM's default fit is RANSAC
    matrix, info = fit_affine(matches, config.affine, seed=config.seed)
    assert _worst_error_mm(matrix, truth) < 0.5
    # A similarity explains most of the true matches within 12 mm; the affine explains all.
    assert info["fit"] == "affine" and info["ransac_inliers"] > 0.6 * (~wrong).sum()
    used = affine_inliers(matches, matrix, config.affine)
    assert len(used) == info["matches_used"] == (~wrong).sum()
    assert used.queried == matches.queried

    plain = config.affine
    plain.ransac_iterations, plain.outlier_factor = 0, 0.0  # SAME's least squares
    assert _worst_error_mm(fit_affine(matches, plain)[0], truth) > 10.0


def test_the_fit_is_seeded():
    truth = _known_affine(np.eye(3))
    matches, _ = _matches(truth, 0.4, noise_mm=2.0)
    config = RegistrationConfig().resolved_for("sam").affine
    first, again = fit_affine(matches, config, seed=3), fit_affine(matches, config, seed=3)
    np.testing.assert_array_equal(first[0], again[0])


@pytest.mark.parametrize(
    "linear, expected_fit",
    [
        (np.diag([1.9, 1.0, 1.0]), "similarity"),  # one axis stretched beyond max_scale
        (np.diag([-1.0, 1.0, 1.0]), "similarity"),  # a reflection
        (np.diag([2.0, 2.0, 2.0]), "rigid"),  # no plausible similarity either
    ],
)
def test_an_implausible_affine_is_refused(linear, expected_fit):
    truth = _known_affine(linear)
    matches, _ = _matches(truth, 0.0)
    config = RegistrationConfig().resolved_for("sam").affine
    matrix, info = fit_affine(matches, config)
    scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    assert info["fit"] == expected_fit and "fit_reason" in info
    assert np.linalg.det(matrix[:3, :3]) > 0
    assert scales.min() >= config.min_scale and scales.max() <= config.max_scale


def test_umeyama_recovers_a_similarity_exactly():
    rng = np.random.default_rng(1)
    truth = _known_affine(1.2 * Rotation.from_euler("z", 30, degrees=True).as_matrix())
    fixed = rng.normal(scale=50, size=(20, 3))
    moving = fixed @ truth[:3, :3].T + truth[:3, 3]
    np.testing.assert_allclose(umeyama(fixed, moving), truth, atol=1e-9)
    rigid = umeyama(fixed, moving, with_scale=False)
    np.testing.assert_allclose(np.linalg.svd(rigid[:3, :3], compute_uv=False), 1.0, atol=1e-9)
