"""Conversions between the library (SimpleITK images, LPS mm) and 3D Slicer's MRML scene (RAS mm).

``slicer`` is imported inside the functions, so the library imports without Slicer.

Coordinates: Slicer's world is RAS, the library's LPS. Converting points, origins, directions and
vectors flips the signs of x and y; a 4x4 matrix ``M`` becomes ``F M F`` with F = diag(-1, -1, 1, 1).

Transforms: the library maps fixed points to moving points, ``p -> A (p + u(p))``, with ``u`` a
dense displacement sampled on a grid in fixed space. Slicer's "FromParent" transform of a node is
the same resampling direction: a volume under node L, with L under node G, is resampled at world
point p from ``L.FromParent(G.FromParent(p))``. So the dense part goes into a grid transform node
G (FromParent = identity + u, on the fixed-space grid) and the affine into a linear transform node
L (FromParent = A) nested *under* G. The opposite nesting would apply u after A, at points of
moving space, which is not where u is sampled. L is the node to put moving data under.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .grid import Grid, slabs

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse: RAS <-> LPS
FLIP = LPS_TO_RAS[:3, :3]
HIGH_SIMILARITY = 0.9  # point-list colours: at or above this a match is shown as "selected"
SLAB_VOXELS = 2_000_000  # voxels per block when transforming every voxel of a volume


def matrix_lps_to_ras(matrix: np.ndarray) -> np.ndarray:
    """A 4x4 point transform in LPS as the same transform in RAS (also RAS -> LPS)."""
    return LPS_TO_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_TO_RAS


def _vtk_matrix(array: np.ndarray):
    import slicer

    return slicer.util.vtkMatrixFromArray(np.asarray(array, dtype=np.float64))


def grid_from_volume_node(node) -> Grid:
    """The sampling grid (LPS) of a volume node, from its own IJK-to-RAS matrix."""
    import slicer
    import vtk

    dims = node.GetImageData().GetDimensions()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_lps = LPS_TO_RAS @ slicer.util.arrayFromVTKMatrix(matrix)
    spacing = np.array(node.GetSpacing())
    return Grid(dims[::-1], spacing, ijk_to_lps[:3, 3], ijk_to_lps[:3, :3] / spacing)


def image_from_volume_node(node) -> sitk.Image:
    """A SimpleITK image (LPS geometry, same voxels) of a scalar volume node.

    The node's own geometry is used; a parent transform, if any, is not applied.
    """
    import slicer

    image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(node).copy())
    return grid_from_volume_node(node).apply_to(image)


def update_volume_node_from_image(node, image: sitk.Image):
    """Fill a volume node with the voxels and geometry of a SimpleITK image; return the node."""
    import slicer

    grid = Grid.from_sitk(image)
    direction = np.eye(4)
    direction[:3, :3] = FLIP @ grid.direction
    with slicer.util.NodeModify(node):
        node.SetOrigin(*(FLIP @ np.asarray(grid.origin)))
        node.SetSpacing(*grid.spacing)
        node.SetIJKToRASDirectionMatrix(_vtk_matrix(direction))
        slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


def set_affine(node, affine_lps: np.ndarray) -> None:
    """Store a fixed -> moving affine (LPS) in a linear transform node as FromParent (RAS)."""
    node.SetMatrixTransformFromParent(_vtk_matrix(matrix_lps_to_ras(affine_lps)))


def grid_transform_from_array(displacement_lps: np.ndarray, grid: Grid):
    """A vtkOrientedGridTransform (RAS) holding a dense displacement, to be set as FromParent.

    ``displacement_lps`` is (z, y, x, 3), LPS mm, sampled on ``grid`` (fixed space). Vectors,
    origin and direction are flipped to RAS; the vectors are not rotated by the grid direction.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    vectors = np.asarray(displacement_lps, dtype=np.float32).reshape(-1, 3) * np.diag(FLIP)
    data = vtk.vtkImageData()
    data.SetDimensions(grid.size_xyz)
    data.SetSpacing(grid.spacing)
    data.SetOrigin(FLIP @ np.asarray(grid.origin))
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors), deep=True)
    array.SetNumberOfComponents(3)
    data.GetPointData().SetScalars(array)
    direction = np.eye(4)
    direction[:3, :3] = FLIP @ grid.direction
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(data)
    transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    transform.SetInterpolationModeToLinear()
    return transform


def read_affine(path) -> np.ndarray:
    """The 4x4 fixed -> moving matrix (LPS) of the library's affine.tfm."""
    return affine_from_sitk(sitk.ReadTransform(str(path)))


def read_deformable(path):
    """The library's deformable.* file (u on the fixed grid, LPS) as a vtkOrientedGridTransform
    for FromParent (RAS), interpolated linearly as the library does.

    Slicer's own transform reader does the LPS -> RAS conversion in C++: no per-voxel Python.
    """
    import slicer

    node = slicer.vtkMRMLGridTransformNode()  # never added to a scene
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise OSError(f"The deformable transform '{path}' could not be read.")
    transform = node.GetTransformFromParentAs("vtkOrientedGridTransform")
    if transform is None:
        raise OSError(f"'{path}' holds no displacement field.")
    transform.SetInterpolationModeToLinear()
    return transform


def affine_from_sitk(transform: sitk.Transform) -> np.ndarray:
    """The 4x4 matrix (LPS) of a SimpleITK affine-like transform read from a .tfm file."""
    affine = sitk.AffineTransform(3)
    affine.SetParameters(transform.GetParameters())
    affine.SetFixedParameters(transform.GetFixedParameters())
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    centre = np.array(affine.GetCenter())
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.array(affine.GetTranslation()) + centre - matrix @ centre
    return out


def set_registration(linear, affine_lps: np.ndarray, grid_node=None, deformable=None) -> None:
    """Put a registration ``p -> A (p + u(p))`` into transform nodes, nested as explained above.

    ``linear`` gets A; with a deformable part (a vtkOrientedGridTransform of u, see
    grid_transform_from_array and read_deformable), ``grid_node`` gets it as FromParent and
    ``linear`` is placed under it, ``grid_node`` under the world. Without one, ``linear`` is
    placed under the world.
    """
    set_affine(linear, affine_lps)
    if deformable is None:
        linear.SetAndObserveTransformNodeID(None)
        return
    grid_node.SetAndObserveTransformFromParent(deformable)
    grid_node.SetAndObserveTransformNodeID(None)
    linear.SetAndObserveTransformNodeID(grid_node.GetID())


def set_reference_volumes(transform_node, fixed, moving) -> None:
    """Record the registered volumes in the roles Slicer's registration modules use."""
    transform_node.SetNodeReferenceID(transform_node.GetFixedNodeReferenceRole(), fixed.GetID())
    transform_node.SetNodeReferenceID(transform_node.GetMovingNodeReferenceRole(), moving.GetID())


def set_matches(
    node, points_lps: np.ndarray, similarity: np.ndarray, prefix: str, color: tuple
) -> None:
    """Replace the control points of a point list with one side of the correspondences.

    Labels are ``{prefix}-i`` (1-based, equal on both sides), each description says the similarity,
    points are locked, and matches at or above HIGH_SIMILARITY are "selected" (selected colour).
    """
    import slicer
    import vtk

    positions = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3) * np.diag(FLIP)
    with slicer.util.NodeModify(node):
        node.RemoveAllControlPoints()
        for i, (position, score) in enumerate(zip(positions, similarity)):
            index = node.AddControlPoint(vtk.vtkVector3d(*position), f"{prefix}-{i + 1}")
            node.SetNthControlPointDescription(index, f"similarity {float(score):.3f}")
            node.SetNthControlPointLocked(index, True)
            node.SetNthControlPointSelected(index, bool(score >= HIGH_SIMILARITY))
        node.SetLocked(True)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(color)
        display.SetColor(0.95, 0.55, 0.1)  # unselected = below HIGH_SIMILARITY: orange


def map_points_through(
    transform_node, points_ras: np.ndarray, to_world: bool = False
) -> np.ndarray:
    """Points (N, 3, RAS) mapped through ``transform_node`` and its parents.

    By default from world, as a volume under the node is resampled (fixed -> moving); with
    ``to_world``, as points under the node are shown (moving -> fixed, the inverse).
    """
    import vtk
    from vtk.util import numpy_support

    transform = vtk.vtkGeneralTransform()
    if to_world:
        transform_node.GetTransformToWorld(transform)
    else:
        transform_node.GetTransformFromWorld(transform)
    source = vtk.vtkPoints()
    source.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points_ras, dtype=np.float64)))
    target = vtk.vtkPoints()
    transform.TransformPoints(source, target)
    return numpy_support.vtk_to_numpy(target.GetData()).astype(np.float64).reshape(-1, 3)


QA_SECONDS_PER_MVOXEL = 1.0  # measured: about 8 s for 8 M voxels on a 2-core machine


def qa_cost(reference) -> tuple[int, float, float]:
    """Voxels, estimated seconds and peak extra memory (MB) of a QA volume on ``reference``."""
    voxels = int(np.prod(reference.GetImageData().GetDimensions()))
    slab_mb = min(voxels, SLAB_VOXELS) * 3 * 4 * 14 / 1e6  # points, field, gradients (float32)
    return voxels, voxels / 1e6 * QA_SECONDS_PER_MVOXEL, voxels * 4 / 1e6 + slab_mb


def displacement_qa_image(transform_node, reference, kind: str = "magnitude") -> sitk.Image:
    """A quality-control image on the grid of ``reference``: displacement magnitude or Jacobian.

    ``magnitude``: length (mm) of the displacement from each voxel to where the transform under
    ``transform_node`` fetches it; ``jacobian``: the determinant of that map's Jacobian (below 0
    means folding; 1 keeps volume). Computed in float32 slabs, so the memory stays bounded.
    """
    if kind not in ("magnitude", "jacobian"):
        raise ValueError(f"kind must be 'magnitude' or 'jacobian', not '{kind}'.")
    grid = grid_from_volume_node(reference)
    to_index = np.linalg.inv(FLIP @ grid.index_to_physical_matrix()[:3, :3]).astype(np.float32)
    values = np.empty(grid.shape, dtype=np.float32)
    # One slice of halo on each side, so the gradient at the slab's faces is the whole one's.
    halo = 0 if kind == "magnitude" else 1
    for z0, z1, points_lps in slabs(grid, SLAB_VOXELS, halo):
        points = points_lps * np.diag(FLIP)  # RAS
        moved = map_points_through(transform_node, points)
        displacement = (moved - points).astype(np.float32).reshape(-1, *grid.shape[1:], 3)
        first = min(z0, halo)  # the slab's first slice among the points
        inner = slice(first, first + z1 - z0)
        if kind == "magnitude":
            values[z0:z1] = np.linalg.norm(displacement, axis=-1)
            continue
        # d(displacement)/d(index) per axis (x, y, z), then to physical with the inverse of
        # direction * spacing; the LPS/RAS flip cancels in the determinant.
        axes = [a for a in (2, 1, 0) if displacement.shape[a] > 1]
        gradients = np.zeros((*displacement[inner].shape, 3), dtype=np.float32)
        for a in axes:
            gradients[..., 2 - a] = np.gradient(displacement, axis=a)[inner]
        values[z0:z1] = np.linalg.det(gradients @ to_index + np.eye(3, dtype=np.float32))
    return grid.apply_to(sitk.GetImageFromArray(values))
