"""Computations done slab by slab to bound memory give what the whole volume gives, on real CT."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SAMERegistrationLib import device as device_module
from SAMERegistrationLib import grid as grid_module
from SAMERegistrationLib import spatial
from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.deform_net import network as network_module
from SAMERegistrationLib.deform_net.checkpoint import load_deform_weights
from SAMERegistrationLib.deform_net.inputs import build_inputs
from SAMERegistrationLib.features.mind import MindExtractor
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.image import to_working_grid
from SAMERegistrationLib.matching import Matches
from SAMERegistrationLib.result import RegistrationResult
from SAMERegistrationLib.stages import deform
from SAMERegistrationLib.stages.deform import DEFAULT_WEIGHTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def working(abdomen_ct):
    return to_working_grid(abdomen_ct, 4.0)


def shifted(grid: Grid, shift_mm: tuple[float, float, float]) -> Alignment:
    """The translation p -> p + shift on ``grid``, as an Alignment."""
    affine = np.eye(4)
    affine[:3, 3] = shift_mm
    return Alignment.identity(grid).with_affine(affine)


def test_deform_network_in_slabs_equals_the_whole_volume(working, monkeypatch) -> None:
    model = load_deform_weights(DEFAULT_WEIGHTS, map_location="cpu")
    maps = MindExtractor().extract(working)
    inputs = build_inputs(working, working, maps, maps, shifted(working.grid, (6, -4, 5)), True)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.network(inputs.moving, inputs.fixed, inputs.correlation)

    whole = run()
    rows, cols = whole.shape[3:]
    monkeypatch.setattr(network_module, "TAIL_SLAB_VOXELS", rows * cols * 5)
    in_slabs = run()
    assert whole.shape[2] > 3 * 5  # several slabs, each with its halo
    assert float(whole.abs().max()) > 0.1  # the shifted pair asks for a field
    # Convolutions of other sizes may sum in another order: a few float32 ulps of a field that
    # reaches about one voxel.
    torch.testing.assert_close(in_slabs, whole, atol=1e-5, rtol=0)


def padded_unet(network, moving, fixed, correlation) -> torch.Tensor:
    """The U-Net's plain forward pass: every layer over the whole padded volume, then the crop."""
    size = moving.shape[2:]
    padded = [-(-n // network_module.MULTIPLE) * network_module.MULTIPLE for n in size]
    x = network_module._pad_to(torch.cat([moving, fixed], dim=1), padded)
    skips = []
    for level, block in enumerate(network.encoder):
        if level == 1:
            x = torch.cat([x, network_module._pad_to(correlation, list(x.shape[2:]))], dim=1)
        x = block(x)
        skips.append(x)
        x = torch.nn.functional.max_pool3d(x, 2)
    for block in network.decoder[:-1]:
        x = torch.cat([torch.nn.functional.interpolate(block(x), scale_factor=2), skips.pop()], 1)
    x = torch.nn.functional.interpolate(network.decoder[-1](x), scale_factor=2)
    x = torch.cat([x, skips.pop()], dim=1)
    for block in network.full_resolution:
        x = block(x)
    return network.flow(x)[:, :, : size[0], : size[1], : size[2]]


def test_deform_network_skips_the_padding_at_full_resolution(working) -> None:
    model = load_deform_weights(DEFAULT_WEIGHTS, map_location="cpu")
    maps = MindExtractor().extract(working)
    inputs = build_inputs(working, working, maps, maps, shifted(working.grid, (6, -4, 5)), True)
    assert all(n % network_module.MULTIPLE for n in working.grid.shape)  # padded on every axis
    with torch.no_grad():
        fast = model.network(inputs.moving, inputs.fixed, inputs.correlation)
        plain = padded_unet(model.network, inputs.moving, inputs.fixed, inputs.correlation)
    assert fast.shape == plain.shape == (1, 3, *working.grid.shape)
    assert float(plain.abs().max()) > 0.1  # the shifted pair asks for a field
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("native_bfloat16", [False, True])
def test_the_deform_stage_predicts_what_the_plain_float32_network_gives(
    working, monkeypatch, native_bfloat16
) -> None:
    if native_bfloat16 and device_module.inference_dtype(torch.device("cpu")) is None:
        pytest.skip("this CPU has no native bfloat16")
    if not native_bfloat16:
        monkeypatch.setattr(deform, "inference_dtype", lambda device: None)
    model = load_deform_weights(DEFAULT_WEIGHTS, map_location="cpu")
    maps = MindExtractor().extract(working)
    inputs = build_inputs(working, working, maps, maps, shifted(working.grid, (6, -4, 5)), True)
    with torch.no_grad():
        plain = padded_unet(model.network, inputs.moving, inputs.fixed, inputs.correlation)
    predicted = deform.predict(model, inputs)
    assert predicted.dtype == torch.float32
    assert predicted.is_contiguous()  # the usual layout for the field code that follows
    assert float(plain.abs().max()) > 0.1  # the shifted pair asks for a field
    if native_bfloat16:  # about 3 significant digits: a few hundredths of a voxel
        torch.testing.assert_close(predicted, plain, atol=0.1, rtol=0.02)
        assert float((predicted - plain).abs().mean()) < 0.01
    else:
        torch.testing.assert_close(predicted, plain, atol=1e-5, rtol=0)


def test_jacobian_in_slabs_equals_the_whole_field(working, monkeypatch) -> None:
    # A field that follows the anatomy: the smoothed CT, in mm, differently per component.
    hu = torch.as_tensor(working.hu)[None, None]
    smooth = spatial.smooth((hu.clamp(-1000, 1000) / 25.0), passes=2)
    field = torch.cat([smooth, -0.5 * smooth.roll(3, dims=2), 0.8 * smooth.roll(-2, dims=4)], 1)
    whole = spatial.jacobian_determinant(field, working.grid)
    assert float(whole.min()) <= 0 < float(whole.max())  # folds somewhere: a strong field
    rows, cols = working.grid.shape[1:]
    for slices in (1, 2, 7):
        monkeypatch.setattr(spatial, "DETERMINANT_SLAB_VOXELS", rows * cols * slices)
        assert torch.equal(spatial.jacobian_determinant(field, working.grid), whole)


def test_warp_in_slabs_equals_the_whole_grid(abdomen_ct, working, monkeypatch) -> None:
    grid = working.grid
    points = grid.voxel_centres()
    dense = np.stack([6 * np.sin(points[..., 1] / 15), 4 * np.cos(points[..., 2] / 12),
                      3 * np.sin(points[..., 0] / 10)]).astype(np.float32)  # fmt: skip
    alignment = Alignment(shifted(grid, (5, -3, 8)).affine, torch.as_tensor(dense)[None], grid)
    none = np.zeros((0, 3))
    fixed_grid = Grid.from_sitk(abdomen_ct)  # not axis-aligned: direction diag(-1, -1, 1)
    result = RegistrationResult(
        fixed_grid, alignment, Matches(none, none, np.zeros(0)),
        RegistrationConfig(features="mind"), "cpu",
    )  # fmt: skip
    labels = sitk.Cast(abdomen_ct > 200, sitk.sitkUInt16) + sitk.Cast(
        abdomen_ct > -300, sitk.sitkUInt16
    )
    for image, is_labels in ((abdomen_ct, False), (labels, True)):
        reference = sitk.Resample(
            image, fixed_grid.reference_image(), result.transform(),
            sitk.sitkNearestNeighbor if is_labels else sitk.sitkLinear,
            0.0 if is_labels else float(sitk.GetArrayViewFromImage(image).min()),
        )  # fmt: skip
        monkeypatch.setattr(
            grid_module, "SLAB_VOXELS", fixed_grid.shape[1] * fixed_grid.shape[2] * 9
        )
        warped = result.warp(image, labels=is_labels)
        assert warped.GetPixelID() == image.GetPixelID()
        assert Grid.from_sitk(warped).matches(fixed_grid)
        assert np.array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(reference))
        assert len(np.unique(sitk.GetArrayViewFromImage(warped))) > 2  # not an empty warp
