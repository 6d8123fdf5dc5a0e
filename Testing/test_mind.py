"""MIND-SSC feature maps: the fine descriptors lie on the feature grid, centred on its voxels."""

import numpy as np
import torch

from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.features import MindExtractor, make_extractor
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.working import WorkingImage


def plane_image(plane_z: int) -> WorkingImage:
    """A uniform body filling a 2 mm grid, with one bright axial slice at working z = plane_z."""
    shape = (40, 24, 24)
    hu = np.full(shape, 40.0, dtype=np.float32)
    hu[plane_z] = 700.0
    return WorkingImage(
        hu, np.ones(shape, dtype=bool), Grid(shape, (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    )


def test_fine_descriptors_are_unit_vectors_on_the_feature_grid(one_thread) -> None:
    maps = MindExtractor(fine=True).extract(plane_image(20))
    assert maps.fine is not None
    assert maps.fine.shape == maps.local.shape == (1, 12, 20, 12, 12)
    norms = maps.fine.norm(dim=1)
    # Unit length where the image has structure, zero where it is uniform (nothing to describe).
    assert torch.all((norms < 1e-4) | ((norms - 1).abs() < 1e-4))
    assert bool((norms > 0.5).any())
    assert float(maps.fine.mean(dim=1).abs().max()) < 1e-5  # centred per voxel


def test_fine_descriptors_respond_symmetrically_about_the_feature_voxel_of_a_plane(
    one_thread,
) -> None:
    # Feature voxel k sits on working voxel 2k: a plane there must leave the same number of
    # feature slices touched above and below it (an average over working voxels 2k and 2k + 1
    # would not).
    for k in (9, 10):
        fine = MindExtractor(fine=True).extract(plane_image(2 * k)).fine
        touched = np.flatnonzero(fine[0].norm(dim=0).amax(dim=(1, 2)).numpy() > 0.5)
        assert touched.size > 1
        assert k - touched[0] == touched[-1] - k, touched


def test_the_pipeline_asks_for_fine_descriptors_only_when_instance_optimisation_reads_them() -> (
    None
):
    cpu = torch.device("cpu")
    default = RegistrationConfig(features="mind")
    assert make_extractor(default, cpu).fine
    off = default.with_overrides({"instance.fine_descriptors": False})
    assert not make_extractor(off, cpu).fine
    assert not make_extractor(default.with_overrides({"instance.enabled": False}), cpu).fine
    maps = make_extractor(off, cpu).extract(plane_image(20))
    assert maps.fine is None  # instance optimisation then compares the local descriptors
