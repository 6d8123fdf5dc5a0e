"""Reading, checking and resampling CT images and label maps.

Images stay SimpleITK images (which keep spacing, origin and any oblique direction) until they are
resampled onto the working grid: an axis-aligned, isotropic LPS grid cropped to the body, the layout
the SAM network was trained on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .checks import check_label_values, check_nifti_finite, check_plausible_ct
from .errors import InputError
from .grid import Grid, axis_aligned_grid_covering
from .working import AIR_HU, WorkingImage

log = logging.getLogger(__name__)

BODY_THRESHOLD_HU = -500.0
CLOSING_RADIUS = 2  # voxels: the body mask's closing bridges gaps this wide
MIN_SIZE = 8  # voxels per axis on the working grid; smaller volumes cannot be registered in 3-D

ImageLike = str | os.PathLike | sitk.Image


def read_image(source: ImageLike, what: str = "image") -> sitk.Image:
    """Read a 3-D image from a file SimpleITK reads, or a folder holding one DICOM series."""
    if isinstance(source, sitk.Image):
        return source
    path = Path(source)
    if not path.exists():
        raise InputError(f"The {what} '{path}' does not exist. Check the path.")
    try:
        if path.is_dir():
            return _read_dicom_folder(path, what)
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise InputError(
            f"The {what} '{path}' could not be read as an image ({reason}). Give a NIfTI, NRRD, "
            "MHA or other file SimpleITK reads, or a folder holding one DICOM series."
        ) from err
    check_nifti_finite(path, what)
    return image


def _read_dicom_folder(folder: Path, what: str) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(
            f"The {what} folder '{folder}' holds no DICOM series. Give an image file or a folder "
            "of DICOM slices."
        )
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(files, key=lambda sid: len(files[sid]))
    if len(series) > 1:
        log.warning(
            "%s folder %s holds %d DICOM series; using the largest (%s, %d slices).",
            what,
            folder,
            len(series),
            chosen,
            len(files[chosen]),
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files[chosen])
    return reader.Execute()


def check_ct(image: sitk.Image, name: str) -> sitk.Image:
    """Refuse images that cannot be registered; return the image as 3-D float32."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel; SAME "
            "registers scalar CT images. Convert it to a single-channel image first."
        )
    size = image.GetSize()
    if min(size) == 0:
        raise InputError(f"The {name} is empty (size {size}). Give a non-empty 3-D scan.")
    if image.GetDimension() != 3 or min(size) < 2:
        raise InputError(
            f"The {name} is {image.GetDimension()}-D with size {'x'.join(map(str, size))}; SAME "
            "registers 3-D volumes. Give the whole 3-D scan (a volume file or a DICOM series folder)."
        )
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    nan_count = int(np.count_nonzero(~np.isfinite(array)))
    if nan_count:
        raise InputError(
            f"The {name} has {nan_count} NaN or infinite voxels. Replace them (for example with "
            f"{AIR_HU:g} HU, air) before registering."
        )
    if float(array.max()) == float(array.min()):
        raise InputError(
            f"The {name} is constant (every voxel is {float(array.min()):g}); there is nothing to "
            "register. Check that the right file was given."
        )
    check_plausible_ct(image, name)
    return image


def check_labels(labels: sitk.Image, image: sitk.Image, name: str) -> sitk.Image:
    """A label map must hold labels 0..2**31-1 on exactly the grid of its image; kept as given."""
    if labels.GetNumberOfComponentsPerPixel() != 1 or labels.GetDimension() != 3:
        raise InputError(f"The {name} must be a 3-D scalar label map.")
    label_grid, image_grid = Grid.from_sitk(labels), Grid.from_sitk(image)
    if not label_grid.matches(image_grid):
        raise InputError(
            f"The {name} does not lie on the grid of its image: labels {label_grid.describe()}, "
            f"image {image_grid.describe()}. Resample the labels onto the image grid (nearest "
            "neighbour) or give the label map made for this image."
        )
    check_label_values(labels, name)
    return labels


def to_working_grid(image: sitk.Image, spacing: float, margin_mm: float = 8.0) -> WorkingImage:
    """Resample onto an axis-aligned isotropic grid and crop it to the body (plus a margin)."""
    full = axis_aligned_grid_covering(Grid.from_sitk(image).corners(), spacing)
    # Resample only the box around the tissue (most of a scan's field of view is air), with room
    # for the closing and the margin: the body and the crop are those of the whole grid.
    reach = int(np.ceil(margin_mm / spacing)) + CLOSING_RADIUS + 2
    full = full.crop(*_tissue_box(image, full, reach))
    hu = resample_array(image, full, sitk.sitkLinear, AIR_HU)
    body = body_mask(hu)
    if not body.any():
        raise InputError(
            f"No body (voxels above {BODY_THRESHOLD_HU:g} HU) was found in the image on a {spacing:g} "
            "mm grid. SAME expects CT in Hounsfield units; check the image and its intensity scale."
        )
    margin = int(np.ceil(margin_mm / spacing))
    nonzero = np.nonzero(body)
    start = tuple(max(int(ax.min()) - margin, 0) for ax in nonzero)
    stop = tuple(min(int(ax.max()) + margin + 1, n) for ax, n in zip(nonzero, body.shape))
    crop = tuple(slice(a, b) for a, b in zip(start, stop))
    grid = full.crop(start, stop)
    if min(grid.shape) < MIN_SIZE:
        raise InputError(
            f"The body in the image spans only {'x'.join(map(str, grid.size_xyz))} voxels on the "
            f"{spacing:g} mm working grid; at least {MIN_SIZE} are needed along each axis. Use a "
            "finer working spacing or a larger scan."
        )
    return WorkingImage(np.ascontiguousarray(hu[crop]), np.ascontiguousarray(body[crop]), grid)


def _tissue_box(image: sitk.Image, grid: Grid, reach: int) -> tuple[tuple, tuple]:
    """(start, stop) voxels (z, y, x) of ``grid`` holding every voxel of ``image`` above the body
    threshold, widened by one voxel of ``image`` (interpolation) and ``reach`` voxels of ``grid``."""
    above = sitk.GetArrayViewFromImage(image) > BODY_THRESHOLD_HU
    spans = [np.flatnonzero(above.any(axis=others)) for others in ((1, 2), (0, 2), (0, 1))]
    if len(spans[0]) == 0:
        return (0, 0, 0), grid.shape
    low = np.array([s[0] for s in spans[::-1]]) - 1.0  # x, y, z
    high = np.array([s[-1] for s in spans[::-1]]) + 1.0
    corners = np.array([[a, b, c] for a in (low[0], high[0]) for b in (low[1], high[1])
                        for c in (low[2], high[2])])  # fmt: skip
    source = Grid.from_sitk(image)
    index = grid.physical_to_index(source.index_to_physical(corners))[:, ::-1]  # z, y, x
    start = np.maximum(np.floor(index.min(axis=0)).astype(int) - reach, 0)
    stop = np.minimum(np.ceil(index.max(axis=0)).astype(int) + reach + 1, grid.shape)
    return tuple(int(v) for v in start), tuple(int(v) for v in stop)


def resample_array(
    image: sitk.Image, grid: Grid, interpolator: int, default: float, transform=None
) -> np.ndarray:
    """Values of ``image`` at the voxel centres of ``grid`` (optionally through a transform)."""
    transform = transform if transform is not None else sitk.Transform()
    out = sitk.Resample(image, grid.reference_image(), transform, interpolator, default)
    return sitk.GetArrayFromImage(out)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient body: the largest component above -500 HU, closed and hole-filled."""
    mask = sitk.GetImageFromArray((hu > BODY_THRESHOLD_HU).astype(np.uint8))
    if not sitk.GetArrayViewFromImage(mask).any():
        return np.zeros(hu.shape, dtype=bool)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    largest = components == 1
    closed = sitk.BinaryMorphologicalClosing(largest, [CLOSING_RADIUS] * 3)
    filled = sitk.BinaryFillhole(closed)
    return sitk.GetArrayFromImage(filled).astype(bool)
