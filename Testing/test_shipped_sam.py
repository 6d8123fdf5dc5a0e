"""The SAM model shipped with the library: its hash, its loading and its embeddings of real CT."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.errors import CheckpointError
from SAMERegistrationLib.features import make_extractor
from SAMERegistrationLib.features.sam import (
    DEFAULT_RECORD,
    DEFAULT_WEIGHTS,
    SamExtractor,
    default_weights,
    verify_shipped_weights,
)
from SAMERegistrationLib.features.sam_network import load_sam_checkpoint
from SAMERegistrationLib.image import to_working_grid
from SAMERegistrationLib.shipped import file_sha256
from SAMERegistrationLib.working import sam_intensity


def test_shipped_weights_match_their_recorded_hash():
    assert default_weights() == DEFAULT_WEIGHTS, "the SAM model must ship with the library"
    record = json.loads(DEFAULT_RECORD.read_text())
    assert file_sha256(DEFAULT_WEIGHTS) == record["sha256"]
    assert verify_shipped_weights() == record["sha256"]
    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20


def test_a_damaged_copy_is_refused(tmp_path):
    copy = tmp_path / "sam_default.pt"
    shutil.copyfile(DEFAULT_WEIGHTS, copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still loadable, silently wrong weights
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded SHA256"):
        verify_shipped_weights(copy, DEFAULT_RECORD)
    with pytest.raises(CheckpointError, match="record of the shipped SAM model"):
        verify_shipped_weights(DEFAULT_WEIGHTS, tmp_path / "missing.json")


def test_features_sam_uses_the_shipped_model_by_default():
    extractor = make_extractor(RegistrationConfig(features="sam"), torch.device("cpu"))
    assert isinstance(extractor, SamExtractor) and extractor.weights == DEFAULT_WEIGHTS
    record = json.loads(DEFAULT_RECORD.read_text())
    assert extractor.network.width == pytest.approx(record["width"])


def test_embeddings_of_real_ct_are_unit_length_with_documented_shapes(abdomen_ct):
    network = load_sam_checkpoint(DEFAULT_WEIGHTS)
    work = to_working_grid(abdomen_ct, 2.0)
    # An odd-sized crop: the network pads to (4, 16, 16) multiples and crops its maps back.
    hu, body = work.hu[:37, :70, :90], work.body[:37, :70, :90]
    x = torch.as_tensor(sam_intensity(hu, body))[None, None]
    with torch.no_grad():
        local, global_ = network(x)
    dim = network.embedding_dim
    assert local.shape == (1, dim, math.ceil(37 / 2), math.ceil(70 / 2), math.ceil(90 / 2))
    assert global_.shape == (1, dim, math.ceil(37 / 4), math.ceil(70 / 16), math.ceil(90 / 16))
    for maps in (local, global_):
        norms = maps.float().norm(dim=1)
        np.testing.assert_allclose(norms.numpy(), 1.0, atol=1e-3)
    # Trained embeddings tell anatomy apart: far-apart voxels are not all alike.
    flat = local[0].reshape(dim, -1).float()
    sim = flat[:, ::97].T @ flat[:, ::97]
    assert sim.min() < 0.5


def test_extractor_maps_cover_the_working_image(abdomen_ct):
    image = sitk.RegionOfInterest(abdomen_ct, (80, 70, 40), (20, 15, 30))
    work = to_working_grid(image, 2.0)
    maps = SamExtractor(DEFAULT_WEIGHTS, torch.device("cpu")).extract(work)
    assert maps.local.shape[2:] == maps.global_.shape[2:] == maps.body.shape
    assert maps.local.shape[2:] == tuple(math.ceil(n / 2) for n in work.grid.shape)
    np.testing.assert_allclose(maps.global_.float().norm(dim=1).numpy(), 1.0, atol=1e-3)
