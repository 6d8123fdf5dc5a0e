"""Slice views rendered headless with Slicer's own vtkMRMLSliceLogic (slicer-core, no display).

``render_views`` gives, per view, the background and foreground layers as Slicer reslices them
(the foreground through its parent transforms, as on screen) and the blended RGBA picture.
Run as a script to write the README's screenshot: a registration through the Logic of a real CT
(TotalSegmentator's example CT by default, or the file given) and the same CT under a known
warp, the three slice views with the correspondence points drawn on them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


@dataclass
class RenderedView:
    name: str
    background: np.ndarray  # (H, W) grey values of the background layer
    foreground: np.ndarray  # (H, W) grey values of the foreground layer (through its transforms)
    rgba: np.ndarray  # (H, W, 4) uint8, the blended view as Slicer draws it (bottom row first)
    xy_to_ras: np.ndarray  # 4x4, pixel (x, y, 0, 1) -> RAS
    inside: np.ndarray  # (H, W) bool: the pixel lies inside the background volume


def _layer_values(layer) -> np.ndarray:
    from vtk.util import numpy_support

    reslice = layer.GetReslice()
    reslice.Update()
    image = reslice.GetOutput()
    width, height, _ = image.GetDimensions()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return values.reshape(height, width, -1)[..., 0].astype(np.float64)


def render_views(scene, background, foreground, centre_ras, size=192, opacity=0.5):
    """Render the three orthogonal slice views through ``centre_ras``, background and foreground
    volume nodes as given (the foreground under whatever transform it has)."""
    import slicer
    from vtk.util import numpy_support

    bounds = np.zeros(6)
    background.GetRASBounds(bounds)
    field_of_view = float(np.max(bounds[1::2] - bounds[::2])) * 1.05
    views = []
    for name, orientation in VIEWS:
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLApplicationLogic(scene.app)
        logic.SetMRMLScene(scene)
        slice_node = logic.AddSliceNode(f"SAMERender{name}")
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(size, size, 1)
        composite = logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID())
        composite.SetForegroundOpacity(opacity)
        # The background's extent as the field of view: the same pixels whatever the foreground.
        slice_node.SetFieldOfView(field_of_view, field_of_view, 1.0)
        slice_node.SetXYZOrigin(0.0, 0.0, 0.0)
        slice_node.JumpSliceByCentering(*map(float, centre_ras))
        blend = logic.GetImageDataConnection().GetProducer()
        blend.Update()
        image = blend.GetOutputDataObject(0)
        rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(size, size, 4)
        views.append(
            RenderedView(
                name,
                _layer_values(logic.GetBackgroundLayer()),
                _layer_values(logic.GetForegroundLayer()),
                rgba.copy(),
                slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS()),
                _inside(background, slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS()), size),
            )
        )
        scene.RemoveNode(composite)
        scene.RemoveNode(slice_node)
    return views


def _inside(volume, xy_to_ras: np.ndarray, size: int) -> np.ndarray:
    """Which pixels of a size x size view lie inside ``volume``'s voxel grid."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(matrix)
    xy_to_ijk = slicer.util.arrayFromVTKMatrix(matrix) @ xy_to_ras
    y, x = np.mgrid[:size, :size]
    pixels = np.stack([x.ravel(), y.ravel(), np.zeros(x.size), np.ones(x.size)])
    ijk = (xy_to_ijk @ pixels)[:3].T
    dims = np.array(volume.GetImageData().GetDimensions())
    return np.all((ijk > -0.5) & (ijk < dims - 0.5), axis=1).reshape(size, size)


def body_difference(views, body_threshold=-500.0) -> float:
    """Mean absolute grey-value difference of the two layers inside the background's body."""
    differences = [
        np.abs(view.background - view.foreground)[view.inside & (view.background > body_threshold)]
        for view in views
    ]
    return float(np.concatenate(differences).mean())


def draw_points(view: RenderedView, points_ras: np.ndarray, color, within_mm=4.0) -> np.ndarray:
    """The view's picture with the points that lie near its plane drawn as small rings."""
    rgba = view.rgba.copy()
    ras_to_xy = np.linalg.inv(view.xy_to_ras)
    height, width = rgba.shape[:2]
    yy, xx = np.mgrid[:height, :width]
    for point in np.asarray(points_ras).reshape(-1, 3):
        x, y, z, _ = ras_to_xy @ np.append(point, 1.0)
        if abs(z) * np.linalg.norm(view.xy_to_ras[:3, 2]) > within_mm:
            continue
        radius = np.hypot(xx - x, yy - y)
        ring = (radius >= 2.0) & (radius <= 3.2)
        rgba[ring] = (*color, 255)
    return rgba


def write_png(rgba: np.ndarray, path: Path) -> None:
    """Write an (H, W, 4) uint8 picture (bottom row first, as VTK stores it) as PNG."""
    import vtk
    from vtk.util import numpy_support

    height, width = rgba.shape[:2]
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(rgba.reshape(-1, 4)), deep=True)
    image.GetPointData().SetScalars(array)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


def ct_pair(ct_path: Path):
    """A real CT as the moving image and, as the fixed one, the same CT through a known affine and
    smooth warp (the module's self-test recipe, on real anatomy)."""
    import SimpleITK as sitk

    from SAMERegistrationLib.grid import Grid
    from SAMERegistrationLib.synthetic import affine_about_centre, known_pair, smooth_displacement

    moving = sitk.ReadImage(str(ct_path))
    affine = affine_about_centre(moving, rotation_deg=(0, 0, 6), translation_mm=(10, -6, 5))
    warp = smooth_displacement(Grid.from_sitk(moving), magnitude_mm=6.0, seed=2)
    return known_pair(moving, sitk.CompositeTransform([affine, warp]))


def make_screenshot(path: Path, ct_path: Path) -> tuple[float, float]:
    """Register a CT pair (see ct_pair) through the Logic and write the three views after the
    registration, the moving CT over the fixed one, with the fixed (green) and moving (blue)
    correspondence points; returns the grey-value difference inside the body before and after."""
    import slicer
    from SAMERegistrationModuleLib.logic import RegistrationLogic
    from SAMERegistrationModuleLib.scenario import SETTINGS
    from slicer_scene import headless_scene

    from SAMERegistrationLib import mrml

    scene = headless_scene()
    pair = ct_pair(ct_path)
    fixed = mrml.update_volume_node_from_image(
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed"), pair.fixed
    )
    moving = mrml.update_volume_node_from_image(
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving"), pair.moving
    )
    for node in (fixed, moving):
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetAutoWindowLevel(False)
        node.GetDisplayNode().SetWindowLevel(400, 40)
    fixed_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    moving_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "M")
    centre = body_centre(fixed)
    before = body_difference(render_views(scene, fixed, moving, centre))
    RegistrationLogic(scene).register(
        fixed, moving, outputFixedPoints=fixed_points, outputMovingPoints=moving_points,
        waitForCompletion=True, **SETTINGS,
    )  # fmt: skip
    views = render_views(scene, fixed, moving, centre, size=256)
    fixed_world = slicer.util.arrayFromMarkupsControlPoints(fixed_points, world=True)
    moving_world = slicer.util.arrayFromMarkupsControlPoints(moving_points, world=True)
    panels = []
    for view in views:
        view.rgba[..., 3] = 255  # opaque: outside the volumes is black, as in Slicer
        view.rgba = draw_points(view, fixed_world, (60, 220, 60))
        panels.append(draw_points(view, moving_world, (60, 150, 255)))
    gap = np.zeros((panels[0].shape[0], 4, 4), np.uint8)
    gap[..., 3] = 255
    write_png(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1), path)
    return before, body_difference(views)


def body_centre(volume) -> np.ndarray:
    """RAS centre of the voxels above -500 HU of a volume node."""
    import slicer
    import vtk

    zyx = np.argwhere(slicer.util.arrayFromVolume(volume) > -500).mean(0)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return (slicer.util.arrayFromVTKMatrix(matrix) @ np.append(zyx[::-1], 1.0))[:3]


if __name__ == "__main__":
    repo = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(repo), str(repo / "SAMERegistration"), str(repo / "Testing")]
    target = repo / "SAMERegistration" / "Resources" / "Screenshots" / "SAMERegistration-slices.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    ct = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else repo.parent / "shared/data/totalseg/example_ct.nii.gz"
    )
    before, after = make_screenshot(target, ct)
    print(f"{target}: grey-value difference in the body {before:.1f} before, {after:.1f} after")
