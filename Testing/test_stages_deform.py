"""stages/deform.run: the network's field u composes before the pre-alignment, phi_pre o (id + u)
(known answers with a network that predicts a constant velocity, on synthetic and real CT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import require_data
from test_deform import translation_weights

from SAMERegistrationLib import register
from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.deform_net.checkpoint import load_deform_weights
from SAMERegistrationLib.errors import ConfigError
from SAMERegistrationLib.features import MindExtractor
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.stages import StageContext, deform
from SAMERegistrationLib.working import WorkingImage

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_composes_the_network_translation_before_the_alignment(tmp_path) -> None:
    grid = Grid((16, 18, 20), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 200, grid.shape).astype(np.float32)
    body = np.ones(grid.shape, dtype=bool)
    image = WorkingImage(hu, body, grid)
    maps = MindExtractor(torch.device("cpu")).extract(image)
    voxels = [1.0, -2.0, 0.5]  # a constant velocity: exp(v) is the translation by v
    model = load_deform_weights(translation_weights(tmp_path / "t.pth", voxels))
    affine = np.array([[1.0, 0.1, 0, 3.0], [0, 0.9, 0, -2.0], [0, 0, 1.1, 1.0], [0, 0, 0, 1.0]])
    field = torch.zeros((1, 3, *grid.shape))
    field[0, 2] = 0.05 * torch.arange(grid.shape[2], dtype=torch.float32)  # u_z = 0.05 * x index
    before = Alignment(affine, field, grid)
    context = StageContext(image, image, deform_model=model, deform_source="t.pth")
    keep_every_field = RegistrationConfig().with_overrides({"deform.min_gain": -1.0})
    after, info = deform.run(maps, maps, before, keep_every_field, context)
    assert info["weights"] == "t.pth" and info["folding_percent"] == 0.0
    t = np.array(voxels) * 4.0
    probes = grid.index_to_physical(rng.uniform(3, np.array(grid.size_xyz) - 4, size=(40, 3)))
    np.testing.assert_allclose(after.map_points(probes), before.map_points(probes + t), atol=1e-3)


def test_run_without_a_network_keeps_the_alignment_and_says_why() -> None:
    grid = Grid((8, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    before = Alignment.identity(grid)
    context = StageContext(deform_source="no SAM-deform network weights were given")
    after, info = deform.run(None, None, before, RegistrationConfig(), context)
    assert after is before
    assert info == {"status": "skipped", "reason": "no SAM-deform network weights were given"}


# --- the stage in the pipeline --------------------------------------------------------------------

PIPELINE = {
    "features": "mind",
    "device": "cpu",
    "working_spacing_mm": 4.0,
    "matching__grid_stride": 4,
    "instance__enabled": False,
}


@pytest.fixture(scope="module")
def ct_pair():
    folder = require_data("openkbp")
    return folder / "train_pt_10_ct.nii.gz", folder / "train_pt_1_ct.nii.gz"


def test_pipeline_composes_the_deform_field_before_the_pre_alignment(ct_pair, tmp_path) -> None:
    fixed, moving = ct_pair
    without = register(fixed, moving, deform__enabled=False, **PIPELINE)
    assert without.stages["deform"] == {"status": "skipped", "reason": "disabled"}

    voxels = [1.0, -2.0, 0.5]  # a constant velocity: exp(v) is the translation by v
    weights = translation_weights(tmp_path / "deform.pth", voxels)
    result = register(
        fixed, moving, deform__weights=str(weights), deform__min_gain=-1.0, **PIPELINE
    )
    stage = result.stages["deform"]
    assert stage["status"] == "done" and stage["variant"] == "svf" and stage["correlation"]
    assert stage["weights"] == str(weights)
    assert stage["folding_percent"] == 0.0
    assert result.dense.shape == (3, *result.working_grid.shape)
    np.testing.assert_array_equal(result.affine, without.affine)
    assert np.abs(without.dense).max() > 1.0  # the coarse field is not a translation

    # Known answer: phi = phi_pre o (id + t), i.e. p -> A((p + t) + u_coarse(p + t)).
    grid = result.working_grid
    t = np.array(voxels) * np.array(grid.spacing)
    rng = np.random.default_rng(0)
    index = rng.integers(3, np.array(grid.size_xyz) - 3, size=(50, 3))
    probes = grid.index_to_physical(index)
    np.testing.assert_allclose(result.map_points(probes), without.map_points(probes + t), atol=1e-3)


def test_deform_weights_of_other_features_are_refused_before_work(ct_pair, tmp_path) -> None:
    weights = translation_weights(tmp_path / "sam_deform.pth", [0.0, 0.0, 0.0], features="sam")
    with pytest.raises(ConfigError, match="trained with sam features"):
        register(*ct_pair, deform__weights=str(weights), **PIPELINE)


NON_HEAD_NECK = [
    "totalseg/example_ct.nii.gz",  # abdomen, whole outline in view
    "popi/popi_phase00_ct_2mm.nii.gz",  # chest, whole outline in view
    "totalseg/aorta_ct_cropped.nii.gz",  # a crop of the chest
]


def shipped_domain() -> dict:
    return deform.read_record(deform.DEFAULT_RECORD)["domain"]


def test_every_openkbp_validation_scan_lies_in_the_shipped_networks_domain(openkbp) -> None:
    from SAMERegistrationLib.image import read_image, to_working_grid

    scans = sorted(openkbp.glob("validation_pt_*_ct.nii.gz"))
    assert len(scans) == 33
    for scan in scans:
        working = to_working_grid(read_image(scan, "scan"), 2.0)
        assert deform.outside_training_domain(working, shipped_domain()) is None, scan.name


@pytest.mark.parametrize("relative", NON_HEAD_NECK)
def test_abdominal_and_chest_scans_lie_outside_it(relative) -> None:
    from SAMERegistrationLib.image import read_image, to_working_grid

    working = to_working_grid(read_image(require_data(relative), "scan"), 2.0)
    reason = deform.outside_training_domain(working, shipped_domain())
    assert reason is not None and "head & neck" in reason and "domain_check=false" in reason


def test_the_pipeline_skips_the_shipped_network_on_an_abdomen_and_says_why(abdomen_ct) -> None:
    crop = abdomen_ct[20:100, 15:85, 30:80]  # smaller, for time; still an abdomen
    result = register(crop, crop, features="mind", coarse__enabled=False, instance__enabled=False)
    assert result.stages["deform"]["status"] == "skipped"
    assert "head & neck" in result.stages["deform"]["reason"]
    forced = register(
        crop, crop, features="mind", coarse__enabled=False, instance__enabled=False,
        deform__domain_check=False,
    )  # fmt: skip
    assert forced.stages["deform"].get("status") in ("done", "rejected")
