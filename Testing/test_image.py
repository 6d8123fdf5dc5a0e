"""Reading images (files and DICOM folders), the working grid, and intensity scaling."""

import numpy as np
import pytest
import SimpleITK as sitk

from SAMERegistrationLib.grid import Grid, axis_aligned_grid_covering
from SAMERegistrationLib.image import body_mask, read_image, resample_array, to_working_grid
from SAMERegistrationLib.synthetic import make_phantom
from SAMERegistrationLib.working import sam_intensity


def write_dicom_series(image: sitk.Image, folder) -> None:
    """One file per slice with the position and orientation tags ITK reads back."""
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000e": series,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "\\".join(map(str, direction[0:7:3] + direction[1:8:3])),
            "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
            "0018|0050": str(image.GetSpacing()[2]),
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_folder_reads_with_its_geometry(tmp_path):
    image, _ = make_phantom(size_xyz=(40, 32, 12), spacing=2.5)
    image.SetOrigin((-50.0, 20.0, 100.0))
    write_dicom_series(image, tmp_path)
    read = read_image(tmp_path)
    assert read.GetSize() == image.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(read.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(image))


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(Exception, match="holds no DICOM series"):
        read_image(tmp_path)


def test_working_grid_keeps_physical_content_of_oblique_image():
    image, _ = make_phantom(size_xyz=(64, 56, 40), spacing=3.0)
    rotation = sitk.VersorTransform((0.2, 0.1, 1.0), np.radians(25)).GetMatrix()
    image.SetDirection(rotation)
    image.SetOrigin((30.0, -40.0, 12.0))
    working = to_working_grid(sitk.Cast(image, sitk.sitkFloat32), spacing=2.0)
    assert working.grid.is_axis_aligned and working.grid.spacing == (2.0, 2.0, 2.0)
    # The value at a working voxel equals the original image at the same physical point.
    rng = np.random.default_rng(0)
    zyx = np.argwhere(working.body)[rng.choice(int(working.body.sum()), 50, replace=False)]
    points = working.grid.index_to_physical(zyx[:, ::-1].astype(float))
    interpolator = sitk.Cast(image, sitk.sitkFloat32)
    expected = [
        sitk.Resample(interpolator, _single_voxel(p), sitk.Transform(), sitk.sitkLinear, -1024)[
            0, 0, 0
        ]
        for p in points
    ]
    np.testing.assert_allclose(working.hu[tuple(zyx.T)], expected, atol=1e-2)
    # The crop keeps the whole body: the original body's corners map inside the working grid.
    original = Grid.from_sitk(image)
    body = np.argwhere(sitk.GetArrayFromImage(image) > 0)
    corners = original.index_to_physical(body[[0, -1]][:, ::-1].astype(float))
    assert working.grid.contains(corners, margin_voxels=1.0).all()


def _whole_grid_working(image: sitk.Image, spacing: float, margin_mm: float = 8.0):
    """The working image the long way: the whole field of view resampled, then cropped."""
    full = axis_aligned_grid_covering(Grid.from_sitk(image).corners(), spacing)
    hu = resample_array(image, full, sitk.sitkLinear, -1024.0)
    body = body_mask(hu)
    margin = int(np.ceil(margin_mm / spacing))
    found = np.nonzero(body)
    start = tuple(max(int(a.min()) - margin, 0) for a in found)
    stop = tuple(min(int(a.max()) + margin + 1, n) for a, n in zip(found, body.shape))
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    return hu[crop], body[crop], full.crop(start, stop)


@pytest.mark.parametrize("spacing", [2.0, 4.0])
def test_working_grid_resampled_around_the_tissue_equals_the_whole_field_of_view(spacing, openkbp):
    """Only the box around the tissue is resampled; the result must not depend on it, on a real
    scan and on an oblique one whose body sits off-centre in a wide field of view."""
    oblique, _ = make_phantom(size_xyz=(90, 70, 40), spacing=3.0)
    oblique = sitk.Cast(oblique, sitk.sitkFloat32)
    oblique[:30, :, :] = -1024.0  # air over a third of the field of view
    oblique.SetDirection(sitk.VersorTransform((0.3, -0.2, 1.0), np.radians(20)).GetMatrix())
    oblique.SetOrigin((-80.0, 15.0, 40.0))
    real = sitk.ReadImage(str(openkbp / "validation_pt_201_ct.nii.gz"))
    for image in (oblique, real):
        hu, body, grid = _whole_grid_working(image, spacing)
        working = to_working_grid(image, spacing)
        assert working.hu.shape == hu.shape and working.grid.shape == grid.shape
        np.testing.assert_allclose(working.grid.origin, grid.origin, atol=1e-9)
        np.testing.assert_array_equal(working.body, body)
        np.testing.assert_allclose(working.hu, hu, atol=1e-3)


def _single_voxel(point) -> sitk.Image:
    ref = sitk.Image([1, 1, 1], sitk.sitkFloat32)
    ref.SetOrigin(tuple(point))
    return ref


def test_sam_intensity_matches_the_documented_mapping():
    hu = np.array([-2000.0, -1024.0, 0.0, 3071.0, 5000.0])
    body = np.array([True, True, True, True, False])
    expected = [-50.0, -50.0, 1024 * 255 / 4095 - 50, 205.0, -50.0]
    np.testing.assert_allclose(sam_intensity(hu, body), expected, rtol=1e-6)
