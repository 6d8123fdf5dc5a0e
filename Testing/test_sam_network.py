"""Tests for the SAM network: output geometry, official checkpoint layout, refusal of bad weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from SAMERegistrationLib.errors import CheckpointError
from SAMERegistrationLib.features.sam_network import (
    SAMNetwork,
    feature_map_sizes,
    load_sam_checkpoint,
    save_sam_checkpoint,
)

OFFICIAL_PARAMETERS = 32_832_960  # facts doc: 32.83 M


def _official_state_dict() -> dict[str, torch.Tensor]:
    """Random weights with the key names and shapes of same-code-facts.md §2, written out by hand."""
    gen = torch.Generator().manual_seed(1)
    state: dict[str, torch.Tensor] = {}

    def conv_bn(prefix: str, shape: tuple[int, ...]) -> None:
        channels = shape[0]
        state[f"{prefix}.conv.weight"] = torch.randn(shape, generator=gen)
        state[f"{prefix}.bn.weight"] = torch.rand(channels, generator=gen) + 0.5
        state[f"{prefix}.bn.bias"] = torch.randn(channels, generator=gen)
        state[f"{prefix}.bn.running_mean"] = torch.randn(channels, generator=gen)
        state[f"{prefix}.bn.running_var"] = torch.rand(channels, generator=gen) + 0.5
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(38000)

    def conv(prefix: str, shape: tuple[int, ...]) -> None:
        state[f"{prefix}.conv.weight"] = torch.randn(shape, generator=gen)
        state[f"{prefix}.conv.bias"] = torch.randn(shape[0], generator=gen)

    conv_bn("backbone.conv1", (64, 1, 3, 7, 7))
    stages = {1: (64, (1, 3, 3)), 2: (128, (1, 3, 3)), 3: (256, (3, 3, 3)), 4: (512, (3, 3, 3))}
    in_channels = 64
    for stage, (channels, kernel) in stages.items():
        conv_bn(f"backbone.layer{stage}.0.conv1", (channels, in_channels, *kernel))
        conv_bn(f"backbone.layer{stage}.0.conv2", (channels, channels, *kernel))
        conv_bn(f"backbone.layer{stage}.0.downsample", (channels, in_channels, 1, 1, 1))
        conv_bn(f"backbone.layer{stage}.1.conv1", (channels, channels, *kernel))
        conv_bn(f"backbone.layer{stage}.1.conv2", (channels, channels, *kernel))
        in_channels = channels
    for level, channels in enumerate((64, 128, 256)):
        conv(f"neck.lateral_convs.{level}", (128, channels, 1, 1, 1))
    conv("neck.fpn_convs.0", (128, 128, 3, 3, 3))
    conv("read_out_head.lateral_convs.0", (128, 512, 1, 1, 1))
    conv("read_out_head.fpn_convs.0", (128, 128, 3, 3, 3))
    return state


@pytest.fixture(scope="module")
def slim_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return SAMNetwork(width=0.25).state_dict()


def _save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"state_dict": state, "meta": {}}, path)
    return path


def _assert_unit_norm(*maps: torch.Tensor) -> None:
    for feature_map in maps:
        assert feature_map.dtype == torch.float32
        norms = feature_map.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_official_width_shapes_and_parameter_count() -> None:
    model = SAMNetwork().eval()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS
    with torch.no_grad():
        local, global_ = model(torch.randn(1, 1, 32, 96, 96))
    assert local.shape == (1, 128, 16, 48, 48)
    assert global_.shape == (1, 128, 8, 6, 6)
    _assert_unit_norm(local, global_)
    assert feature_map_sizes((256, 160, 192)) == ((128, 80, 96), (64, 10, 12))


def test_odd_size_follows_the_ceil_rule() -> None:
    torch.manual_seed(0)
    model = SAMNetwork(width=0.25).eval()
    with torch.no_grad():
        local, global_ = model(torch.randn(2, 1, 21, 37, 50))
    assert local.shape == (2, 128, 11, 19, 25)
    assert global_.shape == (2, 128, 6, 3, 4)
    assert feature_map_sizes((21, 37, 50)) == ((11, 19, 25), (6, 3, 4))
    _assert_unit_norm(local, global_)


def test_odd_sizes_are_padded_at_the_far_end() -> None:
    """Padding must not shift the maps: local voxel i stays on input voxel ~2i for any size."""
    torch.manual_seed(0)
    model = SAMNetwork(width=0.25).eval()
    image = torch.randn(1, 1, 21, 37, 50)
    padded = torch.nn.functional.pad(image, (0, 14, 0, 11, 0, 3), mode="replicate")
    with torch.no_grad():
        local, global_ = model(image)
        local_padded, global_padded = model(padded)
    assert padded.shape[2:] == (24, 48, 64)
    assert torch.equal(local, local_padded[:, :, :11, :19, :25])
    assert torch.equal(global_, global_padded[:, :, :6, :3, :4])


def test_official_layout_checkpoint_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = _official_state_dict()
    extra = {"semantic_head.lateral_convs.0.conv.weight": torch.zeros(128, 64, 1, 1, 1)}
    path = tmp_path / "SAM.pth"
    wrapped = {"module." + k: v for k, v in {**state, **extra}.items()}
    torch.save({"state_dict": wrapped, "meta": {}}, path)

    with caplog.at_level(logging.INFO, logger="SAMERegistrationLib.features.sam_network"):
        model = load_sam_checkpoint(path)
    assert "semantic_head" in caplog.text
    assert model.width == 1.0 and model.embedding_dim == 128
    assert not model.training
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SAMNetwork(width=0.25).eval()
    path = tmp_path / "ours.pth"
    save_sam_checkpoint(model, path, meta={"trained_on": "test"})
    assert not path.with_name("ours.pth.partial").exists()
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta == {"trained_on": "test", "width": 0.25, "embedding_dim": 128}

    reloaded = load_sam_checkpoint(path)
    assert reloaded.width == 0.25
    image = torch.randn(1, 1, 12, 40, 40)
    with torch.no_grad():
        expected = model(image)
        actual = reloaded(image)
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a, b)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_sam_checkpoint(path)
    assert str(path) in str(info.value)


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="could not be read as a PyTorch checkpoint") as info:
        load_sam_checkpoint(path)
    assert str(path) in str(info.value)


def test_file_needing_unsafe_unpickling_is_refused(
    tmp_path: Path, slim_state: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "pickled_objects.pth"
    torch.save({"state_dict": slim_state, "meta": {"seed": np.float64(1.0)}}, path)
    with pytest.raises(CheckpointError, match=r"safe \(weights_only\) loading refuses") as info:
        load_sam_checkpoint(path)
    assert str(path) in str(info.value)


def test_wrong_shape_is_refused(tmp_path: Path, slim_state: dict[str, torch.Tensor]) -> None:
    key = "neck.fpn_convs.0.conv.weight"
    state = {**slim_state, key: torch.zeros(128, 128, 1, 1, 1)}
    path = _save(tmp_path / "wrong_shape.pth", state)
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{key}: expected (128, 128, 3, 3, 3), found (128, 128, 1, 1, 1)" in message
    assert "1 shape mismatches" in message


def test_missing_key_is_refused(tmp_path: Path, slim_state: dict[str, torch.Tensor]) -> None:
    key = "backbone.layer3.0.downsample.conv.weight"
    state = {k: v for k, v in slim_state.items() if k != key}
    path = _save(tmp_path / "missing_key.pth", state)
    with pytest.raises(CheckpointError) as info:
        load_sam_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{key}: expected (64, 32, 1, 1, 1), found missing" in message
    assert "1 missing" in message


def test_file_without_sam_keys_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "other_model.pth", {"encoder.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="contains no SAM network weights") as info:
        load_sam_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "encoder.weight" in message and "backbone.conv1.conv.weight" in message


def test_unknown_extra_keys_are_refused(
    tmp_path: Path, slim_state: dict[str, torch.Tensor]
) -> None:
    path = _save(tmp_path / "extra.pth", {**slim_state, "rpn_head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="rpn_head.weight") as info:
        load_sam_checkpoint(path)
    assert str(path) in str(info.value)
