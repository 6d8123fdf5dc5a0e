"""benchmarks/known_deformations.py: its known maps are what it says, and bad options are refused."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import known_deformations  # noqa: E402


def test_the_known_map_is_the_seeded_affine_after_a_warp_of_the_stated_size(abdomen_ct) -> None:
    phi = known_deformations.deformation(abdomen_ct, seed=0, warp_mm=15.0)
    again = known_deformations.deformation(abdomen_ct, seed=0, warp_mm=15.0)
    affine, warp = (sitk.AffineTransform(phi.GetNthTransform(0)),
                    sitk.DisplacementFieldTransform(phi.GetNthTransform(1)))  # fmt: skip
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    scales = np.linalg.svd(matrix, compute_uv=False)
    assert 0.85 < scales.min() <= scales.max() < 1.15  # rotations keep lengths; scales within 10 %
    assert np.all(np.abs(affine.GetTranslation()) <= 20.0)
    field = sitk.GetArrayFromImage(warp.GetDisplacementField())
    np.testing.assert_allclose(np.linalg.norm(field, axis=-1).max(), 15.0, rtol=1e-6)
    # Seeded: the same seed gives the same map, point for point.
    points = known_deformations.body_points(abdomen_ct, 50, seed=0)
    for p in points:
        np.testing.assert_allclose(phi.TransformPoint(p), again.TransformPoint(p))
    # The points lie in the body, away from the border.
    index = np.array([abdomen_ct.TransformPhysicalPointToIndex(p) for p in points])
    values = sitk.GetArrayFromImage(abdomen_ct)[index[:, 2], index[:, 1], index[:, 0]]
    assert (values > -300).all()
    assert (index >= 4).all() and (index < np.array(abdomen_ct.GetSize()) - 4).all()


def test_unknown_case_is_refused_with_the_choices(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        known_deformations.main(["--cases", "knee"])
    assert "unknown case(s) knee" in str(stop.value) and "abdomen" in str(stop.value)
