"""The SAM-deform network shipped with the library: its hash, its loading, and when it runs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from SAMERegistrationLib.config import DeformConfig
from SAMERegistrationLib.deform_net.checkpoint import (
    deform_meta,
    load_deform_weights,
    save_deform_weights,
)
from SAMERegistrationLib.deform_net.network import DeformNetwork
from SAMERegistrationLib.errors import CheckpointError
from SAMERegistrationLib.features.sam import DEFAULT_WEIGHTS as SAM_WEIGHTS
from SAMERegistrationLib.shipped import file_sha256, verify_shipped
from SAMERegistrationLib.stages.deform import (
    DEFAULT_RECORD,
    DEFAULT_WEIGHTS,
    choose_model,
    shipped_features,
    shipped_weights,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def record() -> dict:
    assert shipped_weights() == DEFAULT_WEIGHTS, "the SAM-deform network must ship"
    return json.loads(DEFAULT_RECORD.read_text())


def test_shipped_network_matches_its_record_and_loads(record) -> None:
    assert file_sha256(DEFAULT_WEIGHTS) == record["sha256"]
    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20
    model = load_deform_weights(DEFAULT_WEIGHTS)
    # The record, the file's own meta and the model card describe the same network.
    assert model.features == record["features"] == shipped_features()
    assert model.variant == record["variant"] == "svf"
    assert model.integration_steps == 7 and model.correlation == record["correlation"]
    assert model.working_spacing_mm == record["working_spacing_mm"]
    assert model.meta["iterations"] == record["iterations"]
    assert record["sha256"] in DEFAULT_RECORD.with_suffix(".md").read_text(encoding="utf-8")
    # It is trained: its flow layer has moved far from the near-zero initialisation.
    assert model.network.flow.weight.abs().max() > 1e-3


def test_a_damaged_copy_is_refused(tmp_path) -> None:
    copy = tmp_path / DEFAULT_WEIGHTS.name
    shutil.copyfile(DEFAULT_WEIGHTS, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded SHA256"):
        verify_shipped(copy, DEFAULT_RECORD, "SAM-deform network", "pass --deform-weights")


def test_the_shipped_network_runs_only_for_its_own_features_and_spacing(record) -> None:
    features, spacing = record["features"], record["working_spacing_mm"]
    model, source = choose_model(DeformConfig(), features, None, spacing, CPU)
    assert source == DEFAULT_WEIGHTS.name and model.features == features

    other = "sam" if features == "mind" else "mind"
    model, reason = choose_model(DeformConfig(), other, SAM_WEIGHTS, spacing, CPU)
    assert model is None
    assert f"trained with {features} features" in reason
    assert f"train-deform --features {other}" in reason

    model, reason = choose_model(DeformConfig(), features, SAM_WEIGHTS, spacing * 2, CPU)
    assert model is None and f"--spacing {spacing:g}" in reason


def test_weights_given_by_the_user_take_precedence(record, tmp_path) -> None:
    given = tmp_path / "mine.pth"
    meta = deform_meta("dvf", False, 7, record["features"], record["working_spacing_mm"])
    save_deform_weights(DeformNetwork(correlation=False), given, meta)
    model, source = choose_model(
        DeformConfig(weights=str(given)), record["features"], None, 2.0, CPU
    )
    assert source == str(given) and model.variant == "dvf" and not model.correlation
