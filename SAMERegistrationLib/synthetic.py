"""Synthetic CT-like volumes and known deformations, for the demo and for tests with known answers.

A pair with a known answer is built so that the true fixed->moving map ``phi`` is explicit: the
moving image is the phantom itself and the fixed image samples it through ``phi``, i.e.
``fixed(p) = moving(phi(p))``. Registration must then find ``phi``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .grid import Grid

PHANTOM_LABELS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen", 5: "spine"}


def make_phantom(
    size_xyz: tuple[int, int, int] = (96, 80, 64),
    spacing: float = 3.0,
    seed: int = 0,
) -> tuple[sitk.Image, sitk.Image]:
    """An abdomen-like CT (int16 HU) and its organ labels (uint8), origin at the first voxel."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(
        *(np.linspace(-1, 1, n) for n in (nz, ny, nx)), indexing="ij"
    )  # normalised coordinates, (z, y, x)
    hu = np.full((nz, ny, nx), -1000.0)
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)

    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1
    fat = (x / 0.8) ** 2 + (y / 0.64) ** 2 >= 1
    hu[body] = 40.0
    hu[body & fat] = -100.0
    lungs = body & (z > 0.35) & (((x - 0.35) / 0.3) ** 2 + (y / 0.4) ** 2 < 1)
    lungs |= body & (z > 0.35) & (((x + 0.35) / 0.3) ** 2 + (y / 0.4) ** 2 < 1)
    hu[lungs] = -820.0

    def ellipsoid(centre, radii):
        return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
            (z - centre[2]) / radii[2]
        ) ** 2 < 1

    organs = [
        (1, ellipsoid((-0.35, -0.05, 0.1), (0.3, 0.3, 0.3)), 65.0),
        (2, ellipsoid((-0.3, 0.3, -0.25), (0.1, 0.12, 0.2)), 160.0),
        (3, ellipsoid((0.3, 0.3, -0.2), (0.1, 0.12, 0.2)), 150.0),
        (4, ellipsoid((0.4, 0.05, 0.15), (0.14, 0.16, 0.18)), 55.0),
    ]
    for label, region, value in organs:
        hu[region & body] = value
        labels[region & body] = label
    vertebra = ((x / 0.09) ** 2 + ((y - 0.45) / 0.09) ** 2 < 1) & (np.cos(z * 14.0) > -0.6)
    disc = ((x / 0.09) ** 2 + ((y - 0.45) / 0.09) ** 2 < 1) & ~vertebra
    hu[vertebra] = 650.0
    hu[disc] = 80.0
    labels[vertebra] = 5
    ribs = body & ~fat & (np.abs(np.sin(z * 9.0)) > 0.93) & ((x / 0.8) ** 2 + (y / 0.64) ** 2 > 0.8)
    hu[ribs] = 500.0

    texture = sitk.GetArrayFromImage(
        sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(rng.normal(0, 1, hu.shape)), 2.0)
    )
    hu[body] += 25.0 * texture[body] / max(texture.std(), 1e-6)
    hu += rng.normal(0, 8, hu.shape)

    image = sitk.GetImageFromArray(np.clip(hu, -1024, 3071).astype(np.int16))
    label_image = sitk.GetImageFromArray(labels)
    for img in (image, label_image):
        img.SetSpacing((spacing,) * 3)
    return image, label_image


def smooth_displacement(
    grid: Grid, magnitude_mm: float, seed: int = 0, smoothness_mm: float = 40.0
) -> sitk.DisplacementFieldTransform:
    """A smooth random displacement on ``grid`` whose largest vector is ``magnitude_mm`` long.

    Random vectors on control points ``smoothness_mm`` apart, interpolated (cubic B-spline) to
    every voxel: the field varies on the scale of ``smoothness_mm`` everywhere, borders included.
    """
    rng = np.random.default_rng(seed)
    extent = np.array(grid.size_xyz) * np.array(grid.spacing)
    nodes = np.maximum(np.ceil(extent / smoothness_mm).astype(int) + 1, 2)
    coarse = sitk.GetImageFromArray(rng.uniform(-1, 1, (*nodes[::-1], 3)), isVector=True)
    coarse.SetSpacing(tuple(float(s) for s in extent / (nodes - 1)))
    coarse.SetOrigin(grid.origin)
    coarse.SetDirection(tuple(grid.direction.ravel()))
    reference = grid.apply_to(sitk.Image(list(grid.size_xyz), sitk.sitkVectorFloat64, 3))
    field = sitk.GetArrayFromImage(
        sitk.Resample(coarse, reference, sitk.Transform(), sitk.sitkBSpline, 0.0)
    )
    field *= magnitude_mm / max(np.linalg.norm(field, axis=-1).max(), 1e-9)
    image = grid.apply_to(sitk.GetImageFromArray(field.astype(np.float64), isVector=True))
    return sitk.DisplacementFieldTransform(image)


def affine_about_centre(
    image: sitk.Image,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    shear: float = 0.0,
) -> sitk.AffineTransform:
    """An affine (fixed -> moving) rotating and scaling about the centre of ``image``."""
    centre = Grid.from_sitk(image).corners().mean(axis=0)
    rx, ry, rz = np.radians(rotation_deg)
    rot_x = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    rot_y = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    rot_z = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    shear_m = np.eye(3)
    shear_m[0, 1] = shear
    matrix = rot_z @ rot_y @ rot_x @ np.diag(scale) @ shear_m
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(centre))
    transform.SetMatrix(matrix.ravel().tolist())
    transform.SetTranslation(translation_mm)
    return transform


@dataclass
class KnownPair:
    """Images whose true fixed->moving map is ``phi`` (a SimpleITK transform)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    phi: sitk.Transform

    def true_map(self, points: np.ndarray) -> np.ndarray:
        return np.array([self.phi.TransformPoint(tuple(map(float, p))) for p in points])


def known_pair(
    moving: sitk.Image, phi: sitk.Transform, moving_labels: sitk.Image | None = None
) -> KnownPair:
    """Build the fixed image (and labels) so that ``fixed(p) = moving(phi(p))`` on moving's grid."""
    fixed = sitk.Resample(moving, moving, phi, sitk.sitkLinear, -1024.0)
    fixed_labels = None
    if moving_labels is not None:
        fixed_labels = sitk.Resample(moving_labels, moving, phi, sitk.sitkNearestNeighbor, 0)
    return KnownPair(fixed, moving, fixed_labels, moving_labels, phi)


def demo_pair(seed: int = 0) -> KnownPair:
    """The demo's pair: a phantom, and a version of it moved by an affine and a smooth warp."""
    moving, labels = make_phantom(seed=seed)
    affine = affine_about_centre(
        moving, rotation_deg=(4.0, -3.0, 6.0), scale=(1.05, 0.97, 1.02), translation_mm=(9, -6, 5)
    )
    warp = smooth_displacement(Grid.from_sitk(moving), magnitude_mm=6.0, seed=seed + 1)
    phi = sitk.CompositeTransform([affine, warp])  # applied right to left: warp first
    return known_pair(moving, phi, labels)
