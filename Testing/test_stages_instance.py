"""stages/instance.run: feature-similarity optimisation moves a slightly wrong alignment towards
the known one and composes its refinement after the incoming map."""

import dataclasses

import numpy as np
import pytest
import torch
from _stage_pairs import GRID, mind_maps, shifted, textured_body

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.stages import instance

SHIFT = np.array([6.0, -4.0, 8.0])


WRONG = np.eye(4)
WRONG[:3, 3] = SHIFT + np.array([2.5, -2.0, 1.5])  # about 3.5 mm off everywhere
CONFIG = (
    RegistrationConfig(features="mind")
    .with_overrides({"instance.iterations": 40, "instance.learning_rate": 0.02})
    .resolved_for("mind")
)


@pytest.mark.parametrize("descriptors", ["fine", "local"])
def test_run_reduces_a_known_misalignment(descriptors, one_thread) -> None:
    fixed = textured_body()
    fixed_maps, moving_maps = mind_maps(fixed, shifted(fixed, SHIFT))
    assert fixed_maps.fine is not None and moving_maps.fine is not None
    if descriptors == "local":  # as for SAM embeddings, which have no finer map
        fixed_maps = dataclasses.replace(fixed_maps, fine=None)
    start = Alignment.identity(GRID).with_affine(WRONG)
    aligned, info = instance.run(fixed_maps, moving_maps, start, CONFIG)
    points = GRID.index_to_physical(np.argwhere(fixed.body[::3, ::3, ::3])[:, ::-1] * 3.0)
    before = np.linalg.norm(start.map_points(points) - (points + SHIFT), axis=1)
    after = np.linalg.norm(aligned.map_points(points) - (points + SHIFT), axis=1)
    assert info["similarity_after"] > info["similarity_before"]
    assert after.mean() < 0.5 * before.mean(), f"{before.mean():.2f} -> {after.mean():.2f} mm"
    np.testing.assert_array_equal(aligned.affine, WRONG)  # the refinement lives in the field


def test_the_fine_descriptors_replace_the_local_ones_when_both_scans_have_them(one_thread) -> None:
    fixed = textured_body()
    fixed_maps, moving_maps = mind_maps(fixed, shifted(fixed, SHIFT))
    start = Alignment.identity(GRID).with_affine(WRONG)
    noise = torch.nn.functional.normalize(torch.randn_like(moving_maps.local), dim=1)
    garbled = dataclasses.replace(moving_maps, local=noise)
    aligned, info = instance.run(fixed_maps, moving_maps, start, CONFIG)
    same, same_info = instance.run(fixed_maps, garbled, start, CONFIG)
    assert torch.equal(same.field, aligned.field)  # the local map was not read
    assert same_info == info
    unused = dataclasses.replace(garbled, fine=None)  # now the noise is what the stage sees
    _, noisy_info = instance.run(fixed_maps, unused, start, CONFIG)
    assert noisy_info["similarity_before"] < info["similarity_before"] - 0.1
