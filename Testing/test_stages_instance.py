"""stages/instance.run: feature-similarity optimisation moves a slightly wrong alignment towards
the known one and composes its refinement after the incoming map."""

import numpy as np
import torch
from _stage_pairs import GRID, mind_maps, shifted, textured_body

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.stages import instance

SHIFT = np.array([6.0, -4.0, 8.0])


def test_run_reduces_a_known_misalignment() -> None:
    torch.set_num_threads(1)
    fixed = textured_body()
    fixed_maps, moving_maps = mind_maps(fixed, shifted(fixed, SHIFT))
    wrong = np.eye(4)
    wrong[:3, 3] = SHIFT + np.array([2.5, -2.0, 1.5])  # about 3.5 mm off everywhere
    start = Alignment.identity(GRID).with_affine(wrong)
    config = (
        RegistrationConfig(features="mind")
        .with_overrides({"instance.iterations": 40, "instance.learning_rate": 0.02})
        .resolved_for("mind")
    )
    aligned, info = instance.run(fixed_maps, moving_maps, start, config)
    points = GRID.index_to_physical(np.argwhere(fixed.body[::3, ::3, ::3])[:, ::-1] * 3.0)
    before = np.linalg.norm(start.map_points(points) - (points + SHIFT), axis=1)
    after = np.linalg.norm(aligned.map_points(points) - (points + SHIFT), axis=1)
    assert info["similarity_after"] > info["similarity_before"]
    assert after.mean() < 0.5 * before.mean(), f"{before.mean():.2f} -> {after.mean():.2f} mm"
    np.testing.assert_array_equal(aligned.affine, wrong)  # the refinement lives in the field
