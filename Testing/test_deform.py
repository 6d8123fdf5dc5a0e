"""SAM-deform: scaling and squaring, the correlation input, the network's shapes and units, its
weights file (the stage itself: test_stages_deform)."""

from __future__ import annotations

import math

import pytest
import torch

from SAMERegistrationLib import spatial
from SAMERegistrationLib.deform_net.checkpoint import (
    deform_meta,
    load_deform_weights,
    save_deform_weights,
)
from SAMERegistrationLib.deform_net.correlation import ZERO_OFFSET, correlation
from SAMERegistrationLib.deform_net.field import displacement
from SAMERegistrationLib.deform_net.network import DeformNetwork
from SAMERegistrationLib.errors import CheckpointError
from SAMERegistrationLib.features.sam_network import SAMNetwork, save_sam_checkpoint
from SAMERegistrationLib.grid import Grid

# An odd-sized, anisotropic grid: channel order and units mix up visibly on it.
GRID = Grid((23, 17, 29), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _x_wave(grid: Grid, amplitude_times_k: float) -> torch.Tensor:
    """v = (A sin(k x), 0, 0) in mm with one period over the grid's x extent; A k is given."""
    points = spatial.voxel_points(grid)[0]
    x = points[..., 0] - grid.origin[0]
    k = 2 * math.pi / ((grid.size_xyz[0] - 1) * grid.spacing[0])
    field = torch.zeros((1, 3, *grid.shape))
    field[0, 0] = amplitude_times_k / k * torch.sin(k * x)
    return field


# --- scaling and squaring -------------------------------------------------------------------------


def test_integrating_v_and_minus_v_composes_to_the_identity() -> None:
    v = _x_wave(GRID, 0.5)
    forward = spatial.integrate_velocity(v, GRID, 7)
    backward = spatial.integrate_velocity(-v, GRID, 7)
    assert forward.abs().max() > 3.0  # a real deformation, several mm
    roundtrip = spatial.compose(forward, backward, GRID)  # (id + f) o (id + b)
    error = roundtrip.norm(dim=1)[0, :, :, 2:-2]  # away from the x borders, clamped by sampling
    assert error.max() < 0.05 * GRID.spacing[0]


def test_svf_stays_invertible_where_the_same_field_as_displacement_folds() -> None:
    v = _x_wave(GRID, 2.0)  # d(v_x)/dx reaches -2: 1 + du/dx < 0 for a displacement
    assert float(spatial.jacobian_determinant(v, GRID).min()) < 0
    det = spatial.jacobian_determinant(spatial.integrate_velocity(v, GRID, 7), GRID)
    assert float(det.min()) > 0


def test_network_output_is_in_voxels_with_xyz_channels() -> None:
    network = DeformNetwork(correlation=False)
    for parameter in network.parameters():
        torch.nn.init.zeros_(parameter)
    with torch.no_grad():
        network.flow.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))  # voxels along x, y, z
    image = torch.randn(1, 1, *GRID.shape)
    output = network(image, image)
    expected = torch.tensor([1.5, -4.0, 1.25]).view(1, 3, 1, 1, 1)  # times spacing (x, y, z)
    for variant in ("svf", "dvf"):  # a constant velocity integrates to itself
        u = displacement(output, GRID, variant, 7)
        torch.testing.assert_close(u, expected.expand_as(u), atol=1e-5, rtol=0)


# --- the correlation input and the network's shapes -------------------------------------------------


def test_correlation_of_identical_maps_peaks_at_the_zero_offset() -> None:
    torch.manual_seed(0)
    maps = torch.nn.functional.normalize(torch.randn(1, 16, 9, 10, 11), dim=1)
    corr = correlation(maps, maps)
    assert corr.shape == (1, 27, 9, 10, 11)
    torch.testing.assert_close(corr[:, ZERO_OFFSET], torch.ones(1, 9, 10, 11))
    assert torch.all(corr.max(dim=1).values <= 1 + 1e-6)
    # Inside, every other offset meets another (random) vector; at the border, replicate padding
    # repeats the voxel itself, so some offsets tie with the zero offset there.
    assert torch.all(corr[..., 1:-1, 1:-1, 1:-1].argmax(dim=1) == ZERO_OFFSET)
    # Moving shifted one voxel forward along W: the fixed voxel x is found at x + (0, 0, +1),
    # channel 9 * 1 + 3 * 1 + 2 = 14 (offsets along D, H, W).
    shifted = torch.roll(maps, shifts=1, dims=4)
    interior = correlation(maps, shifted)[..., 1:-1, 1:-1, :-1].argmax(dim=1)
    assert torch.all(interior == 14)


def test_odd_sized_inputs_give_a_field_on_exactly_the_input_grid() -> None:
    network = DeformNetwork(correlation=True)
    image = torch.randn(1, 1, *GRID.shape)
    half = [math.ceil(n / 2) for n in GRID.shape]
    with torch.no_grad():
        output = network(image, image, torch.randn(1, 27, *half))
    assert output.shape == (1, 3, *GRID.shape)
    assert displacement(output, GRID, "svf", 7).shape == (1, 3, *GRID.shape)
    assert output.abs().max() < 1e-2  # the flow layer starts near zero: near the identity
    with pytest.raises(ValueError, match="half-resolution"):
        network(image, image, torch.randn(1, 27, *GRID.shape))


# --- the weights file ----------------------------------------------------------------------------


def translation_weights(path, voxels, features="mind", correlation_input=True, spacing=4.0):
    """A network that predicts the constant velocity ``voxels`` (x, y, z) whatever it sees."""
    network = DeformNetwork(correlation=correlation_input)
    for parameter in network.parameters():
        torch.nn.init.zeros_(parameter)
    with torch.no_grad():
        network.flow.bias.copy_(torch.tensor(voxels))
    save_deform_weights(network, path, deform_meta("svf", correlation_input, 7, features, spacing))
    return path


def test_weights_files_that_cannot_be_used_are_refused_clearly(tmp_path) -> None:
    good = translation_weights(tmp_path / "deform.pth", [1.0, 0.0, 0.0])
    model = load_deform_weights(good)
    assert (model.variant, model.correlation, model.features) == ("svf", True, "mind")

    with pytest.raises(CheckpointError, match="does not exist"):
        load_deform_weights(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt.pth.*truncated or corrupt"):
        load_deform_weights(corrupt)
    sam = tmp_path / "sam.pth"
    save_sam_checkpoint(SAMNetwork(width=0.125, embedding_dim=8), sam)
    with pytest.raises(CheckpointError, match="SAM checkpoint: give it with --weights"):
        load_deform_weights(sam)
    payload = torch.load(good, weights_only=True)
    payload["meta"]["variant"] = "bspline"
    torch.save(payload, tmp_path / "variant.pth")
    with pytest.raises(CheckpointError, match="variant 'bspline'"):
        load_deform_weights(tmp_path / "variant.pth")
    payload["meta"].update(variant="svf", correlation=False)  # weights of the correlation input
    torch.save(payload, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointError, match="encoder.1.0.weight: expected"):
        load_deform_weights(tmp_path / "mismatch.pth")
