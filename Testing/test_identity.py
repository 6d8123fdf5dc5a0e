"""Identical scans give the identity: the coarse, deform and instance stages keep an alignment they
do not improve, and say so in the report (status "rejected", the similarity before and after)."""

from __future__ import annotations

import numpy as np
import pytest
from _stage_pairs import GRID, mind_maps, shifted, textured_body
from conftest import require_data, torch_threads
from test_deform import translation_weights

from SAMERegistrationLib import cli, register
from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.deform_net.checkpoint import load_deform_weights
from SAMERegistrationLib.stages import StageContext, deform, instance

VOXELS = [2.0, -1.5, 1.0]  # the constant velocity of the test network, in working voxels
SHIFT_MM = np.array(VOXELS) * np.array(GRID.spacing)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shifted_pair():
    """A body and the same body moved by SHIFT_MM: the true map is p -> p + SHIFT_MM."""
    fixed = textured_body()
    moving = shifted(fixed, SHIFT_MM)
    return fixed, moving, *mind_maps(fixed, moving)


def aligned_by_translation() -> Alignment:
    affine = np.eye(4)
    affine[:3, 3] = SHIFT_MM
    return Alignment.identity(GRID).with_affine(affine)


def test_deform_keeps_a_field_that_helps_and_rejects_one_that_harms(shifted_pair, tmp_path) -> None:
    fixed, moving, fixed_maps, moving_maps = shifted_pair
    # A real network whose weights are zero but for the flow bias: it predicts the translation
    # SHIFT_MM whatever it sees.
    model = load_deform_weights(translation_weights(tmp_path / "t.pth", VOXELS, spacing=2.0))
    context = StageContext(fixed, moving, deform_model=model, deform_source="t.pth")
    config = RegistrationConfig(features="mind")
    probes = GRID.index_to_physical(
        np.random.default_rng(0).uniform(4, np.array(GRID.size_xyz) - 5, size=(40, 3))
    )

    # From the scanner's coordinates the network's translation is the answer: kept.
    start = Alignment.identity(GRID)
    helped, info = deform.run(fixed_maps, moving_maps, start, config, context)
    assert "status" not in info, info.get("reason")
    assert info["similarity_after"] > info["similarity_before"] + config.deform.min_gain
    np.testing.assert_allclose(helped.map_points(probes), probes + SHIFT_MM, atol=1e-3)

    # From the true alignment the same field moves the pair apart: rejected, alignment kept.
    aligned = aligned_by_translation()
    kept, info = deform.run(fixed_maps, moving_maps, aligned, config, context)
    assert kept is aligned
    assert info["status"] == "rejected" and "deform.min_gain" in info["reason"]
    assert info["similarity_after"] < info["similarity_before"]
    assert info["displacement_max_mm"] == pytest.approx(np.linalg.norm(SHIFT_MM), abs=0.05)

    # The gate can be switched off: every field is then kept.
    config = config.with_overrides({"deform.min_gain": -1.0})
    moved, info = deform.run(fixed_maps, moving_maps, aligned, config, context)
    assert "status" not in info
    np.testing.assert_allclose(moved.map_points(probes), probes + 2 * SHIFT_MM, atol=1e-3)


def test_instance_does_not_move_a_perfect_alignment(shifted_pair) -> None:
    _, _, fixed_maps, moving_maps = shifted_pair
    config = RegistrationConfig(features="mind").resolved_for("mind")
    aligned = aligned_by_translation()
    kept, info = instance.run(fixed_maps, moving_maps, aligned, config)
    assert kept is aligned
    assert info["status"] == "rejected" and "instance.min_gain" in info["reason"]
    assert info["similarity_after"] - info["similarity_before"] < config.instance.min_gain


@pytest.fixture(scope="module")
def ct_against_itself():
    ct = require_data("openkbp") / "validation_pt_201_ct.nii.gz"
    with torch_threads(1):
        return register(ct, ct)  # the default configuration: all stages, MIND, 2 mm


def test_a_real_ct_registered_to_itself_is_left_by_the_deformable_stages(ct_against_itself) -> None:
    result = ct_against_itself
    assert result.features == "mind" and result.config.working_spacing_mm == 2.0
    for stage in ("coarse", "deform", "instance"):
        info = result.stages[stage]
        assert info["status"] == "rejected", info
        assert f"{stage}.min_gain" in info["reason"]
    # Inside the body the map stays within a working voxel of the identity.
    maps = result.fixed_features
    displacement = result.alignment.displacement_on(maps.grid)
    inside = np.linalg.norm(displacement, axis=-1)[maps.body]
    assert inside.max() < result.config.working_spacing_mm, f"max {inside.max():.2f} mm"


def test_the_command_line_summary_names_the_stages_not_kept(ct_against_itself, capsys, tmp_path):
    cli._print_summary(ct_against_itself, {"report": tmp_path / "report.json"}, 1.0)
    printed = capsys.readouterr().out
    for stage in ("coarse", "deform", "instance"):
        assert f"  {stage}: not kept (" in printed and f"{stage}.min_gain" in printed


def test_a_real_ct_registered_to_itself_stays_within_a_voxel_everywhere(ct_against_itself) -> None:
    result = ct_against_itself
    displacement = np.linalg.norm(result.total_displacement(), axis=-1)
    assert displacement.max() < result.config.working_spacing_mm, f"max {displacement.max():.2f} mm"
    # The affine alone is the identity to a fraction of a voxel at every corner of the scan.
    corners = result.fixed_grid.corners()
    moved = corners @ result.affine[:3, :3].T + result.affine[:3, 3]
    assert np.linalg.norm(moved - corners, axis=1).max() < 0.5
