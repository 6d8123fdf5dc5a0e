"""Checks that an input is a usable CT in Hounsfield units, run before any heavy work.

Each check names the real problem (a truncated file, raw scanner units, an MR, NaN hidden by the
NIfTI reader) instead of letting the registration run for minutes and fail with a misleading
diagnosis. The statistics use every ``SAMPLE_STEP``-th voxel per axis, so they take well under a
second even for large scans.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError

SAMPLE_STEP = 2
AIR_RANGE_HU = (-1200.0, -800.0)  # air and lung; padding outside the field of view lies below
MIN_AIR_SHARE = 0.01  # less air than this: the body would fill the whole volume
RAW_AIR_RANGE = (-200.0, 150.0)  # air in raw scanner units (HU + 1024)
RAW_TISSUE_RANGE = (850.0, 1250.0)  # fat, water and soft tissue in raw scanner units
BONE_LIMIT_HU = 4000.0  # dense bone and contrast stay below; metal is a few voxels at most
MAX_OUT_OF_RANGE_SHARE = 0.01
MAX_LABEL = 2**31 - 1  # label maps travel as 32-bit integers (3D Slicer, ITK label images)

# NIfTI datatype codes of floating-point voxels and their numpy types (little-endian).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK_BYTES = 1 << 24


def check_plausible_ct(image: sitk.Image, name: str) -> None:
    """Refuse an image that is not a complete CT in Hounsfield units; ``image`` is float32."""
    array = sitk.GetArrayViewFromImage(image)
    _check_zero_faces(array, name)
    sample = np.asarray(array[::SAMPLE_STEP, ::SAMPLE_STEP, ::SAMPLE_STEP], dtype=np.float32)
    low, high = float(sample.min()), float(sample.max())
    air = _share(sample, *AIR_RANGE_HU)
    if air < MIN_AIR_SHARE:
        if _looks_like_raw_units(sample):
            raise InputError(
                f"The {name} looks like a CT in raw scanner units (air near 0, soft tissue near "
                f"1024; values {low:g} to {high:g}), not in Hounsfield units. Convert it to HU "
                "(subtract 1024, or apply the DICOM rescale slope and intercept) and run again."
            )
        raise InputError(
            f"The {name} does not look like a CT in Hounsfield units: {air:.1%} of its voxels "
            f"are air (about -1000 HU) and its values span {low:g} to {high:g}, so the body would "
            "fill the whole volume. SAME registers CT: give CT scans in HU that show the body with "
            "air around it (not MR or another modality, not normalised intensities)."
        )
    # Padding outside the field of view is one constant value below air (-2048, -3024, ...).
    below = (sample < AIR_RANGE_HU[0]) & (sample > low)
    outside = float(below.mean()) + float((sample > BONE_LIMIT_HU).mean())
    if outside > MAX_OUT_OF_RANGE_SHARE:
        raise InputError(
            f"{outside:.1%} of the voxels of the {name} lie outside the range of CT in Hounsfield "
            f"units ({AIR_RANGE_HU[0]:g} to {BONE_LIMIT_HU:g} HU; its values span {low:g} to "
            f"{high:g}). Check the intensity scale (rescale slope and intercept) of the file."
        )


def _share(values: np.ndarray, low: float, high: float) -> float:
    return float(((values >= low) & (values <= high)).mean())


def _looks_like_raw_units(sample: np.ndarray) -> bool:
    """Air near 0 and most of the rest in the soft-tissue band around 1024."""
    if _share(sample, *RAW_AIR_RANGE) < MIN_AIR_SHARE:
        return False
    rest = sample[sample > RAW_AIR_RANGE[1]]
    return rest.size > 0 and _share(rest, *RAW_TISSUE_RANGE) > 0.5


def _check_zero_faces(array: np.ndarray, name: str) -> None:
    """Whole slices of exactly 0 HU at a face: missing data, not anatomy (air is -1000 HU)."""
    if not (array < AIR_RANGE_HU[1]).any():
        return  # no air at -1000 HU: 0 may be the background of another modality; checked later
    for axis in range(3):
        moved = np.moveaxis(array, axis, 0)
        for end, slices in (("last", moved[::-1]), ("first", moved)):
            count = 0
            while count < len(slices) and not slices[count].any():
                count += 1
            if count:
                raise InputError(
                    f"The {end} {count} of {len(slices)} slices along {'zyx'[axis]} of the {name} "
                    f"are exactly 0 everywhere: the file is probably truncated (an "
                    "incomplete download or copy; SimpleITK fills the missing part with zeros) or "
                    "the volume was padded with 0 instead of air. Copy the file again, or pad "
                    "with -1024 HU."
                )


def check_nifti_finite(path: Path, what: str) -> None:
    """Count NaN and infinite voxels in a floating-point NIfTI file.

    SimpleITK reads NIfTI through niftilib, whose ``nifti_read_buffer`` replaces every non-finite
    float with 0 while reading, so the image it returns cannot show them: a NaN region would be
    registered as water. The voxel data is read again here, straight from the file.
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    try:
        bad = _count_nonfinite_nifti(path, gzip.open if name.endswith(".gz") else open)
    except (OSError, EOFError, zlib.error):
        return  # a damaged or truncated file: its zero-filled part is named by the CT checks
    if bad:
        raise InputError(
            f"The {what} '{path}' holds {bad} NaN or infinite voxels (SimpleITK reads them from "
            "NIfTI as 0). Replace them (in a CT, with -1024 HU, air) before registering."
        )


def _count_nonfinite_nifti(path: Path, opener) -> int:
    with opener(path, "rb") as handle:
        layout = _nifti_float_layout(handle.read(540))
        if layout is None:
            return 0
        dtype, offset, remaining = layout
        handle.seek(offset)
        bad = 0
        while remaining:
            chunk = handle.read(min(remaining * dtype.itemsize, _CHUNK_BYTES))
            usable = len(chunk) // dtype.itemsize
            if not usable:
                break
            values = np.frombuffer(chunk[: usable * dtype.itemsize], dtype=dtype)
            bad += int(np.count_nonzero(~np.isfinite(values)))
            remaining -= usable
    return bad


def _nifti_float_layout(header: bytes) -> tuple[np.dtype, int, int] | None:
    """(voxel dtype, data offset, voxel count) of a float NIfTI-1 or NIfTI-2 header, else None."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            datatype = struct.unpack(order + "h", header[70:72])[0]
            dims = struct.unpack(order + "8h", header[40:56])
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype = struct.unpack(order + "h", header[12:14])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if datatype not in _NIFTI_FLOATS:
        return None
    count = int(np.prod([max(d, 1) for d in dims[1 : 1 + max(min(dims[0], 7), 1)]]))
    return np.dtype(order + _NIFTI_FLOATS[datatype]), offset, count


def check_label_values(labels: sitk.Image, name: str) -> None:
    """Label values must be whole numbers from 0 (background) to ``MAX_LABEL``."""
    array = sitk.GetArrayViewFromImage(labels)
    if np.issubdtype(array.dtype, np.floating) and (
        not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))
    ):
        raise InputError(f"The {name} has non-integer values; give an integer label map.")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > MAX_LABEL:
        raise InputError(
            f"The {name} has label values from {low:.15g} to {high:.15g}; labels must be whole "
            f"numbers from 0 (background) to {MAX_LABEL}. Renumber the labels (for example with "
            "SimpleITK's ChangeLabel) and run again."
        )
