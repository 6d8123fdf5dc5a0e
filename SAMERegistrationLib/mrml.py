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

from .grid import Grid

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


def set_displacement(node, displacement_lps: np.ndarray, grid: Grid) -> None:
    """Store a dense displacement in a grid transform node as FromParent = identity + u.

    ``displacement_lps`` is (z, y, x, 3), LPS mm, sampled on ``grid`` (fixed space). Vectors,
    origin and direction are flipped to RAS; the vectors are not rotated by the grid direction.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    vectors = np.asarray(displacement_lps, dtype=np.float64).reshape(-1, 3) * np.diag(FLIP)
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
    node.SetAndObserveTransformFromParent(transform)


def dense_from_total(total_lps: sitk.Image, affine_lps: np.ndarray) -> tuple[np.ndarray, Grid]:
    """The dense part ``u`` of a map given whole, ``t(p) = A (p + u(p)) - p``, on the same grid.

    Returns (z, y, x, 3) float32 LPS mm: ``u = A^-1 (p + t) - p``, computed in slabs.
    """
    grid = Grid.from_sitk(total_lps)
    total = sitk.GetArrayViewFromImage(total_lps)
    inverse = np.linalg.inv(np.asarray(affine_lps, dtype=np.float64))
    dense = np.empty(total.shape, dtype=np.float32)
    rows = max(1, SLAB_VOXELS // (grid.shape[1] * grid.shape[2]))
    y, x = np.meshgrid(np.arange(grid.shape[1]), np.arange(grid.shape[2]), indexing="ij")
    for z0 in range(0, grid.shape[0], rows):
        z = np.arange(z0, min(z0 + rows, grid.shape[0]))
        index = np.stack(np.broadcast_arrays(x[None], y[None], z[:, None, None]), axis=-1)
        points = grid.index_to_physical(index.reshape(-1, 3))
        moved = points + total[z0 : z0 + len(z)].reshape(-1, 3)
        source = moved @ inverse[:3, :3].T + inverse[:3, 3]
        dense[z0 : z0 + len(z)] = (source - points).reshape(len(z), *x.shape, 3)
    return dense, grid


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


def transform_parts_from_result(result) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Affine (LPS), dense part (z, y, x, 3; LPS mm) and its grid, from a RegistrationResult."""
    return result.affine, np.moveaxis(result.dense, 0, -1), result.working_grid


def transform_parts_from_files(
    affine_path, field_path=None
) -> tuple[np.ndarray, np.ndarray | None, Grid | None]:
    """The same from the library's output files: affine.tfm and, for a deformable run, the whole
    map as a displacement field (transform.nii.gz), from which the dense part is recovered."""
    affine = affine_from_sitk(sitk.ReadTransform(str(affine_path)))
    if field_path is None:
        return affine, None, None
    dense, grid = dense_from_total(sitk.ReadImage(str(field_path)), affine)
    return affine, dense, grid


def set_registration(
    linear, affine_lps: np.ndarray, grid_node=None, dense_lps=None, grid: Grid | None = None
) -> None:
    """Put a registration ``p -> A (p + u(p))`` into transform nodes, nested as explained above.

    ``linear`` gets A; with a dense part, ``grid_node`` gets u and ``linear`` is placed under it,
    ``grid_node`` under the world. Without one, ``linear`` is placed under the world.
    """
    set_affine(linear, affine_lps)
    if dense_lps is None:
        linear.SetAndObserveTransformNodeID(None)
        return
    set_displacement(grid_node, dense_lps, grid)
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


def resample_to_reference(moving, fixed, output) -> None:
    """Resample ``moving`` through its parent transforms onto the grid of ``fixed`` into ``output``.

    Uses Slicer's ResampleVolumeToReferenceVolume (which keeps the reference geometry, unlike
    hardening the transform), then moves the voxels into the chosen output node.
    """
    import slicer
    import vtk

    scene = moving.GetScene()
    resampled = slicer.vtkSlicerVolumesLogic.ResampleVolumeToReferenceVolume(moving, fixed)
    if resampled is None:
        raise RuntimeError(f"Slicer could not resample '{moving.GetName()}' onto the fixed grid.")
    try:
        matrix = vtk.vtkMatrix4x4()
        resampled.GetIJKToRASMatrix(matrix)
        with slicer.util.NodeModify(output):
            output.SetIJKToRASMatrix(matrix)
            image = vtk.vtkImageData()
            image.DeepCopy(resampled.GetImageData())
            output.SetAndObserveImageData(image)
            output.SetAndObserveTransformNodeID(None)
    finally:
        if resampled.GetScene() is not None:
            scene.RemoveNode(resampled)


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


def displacement_qa_image(transform_node, reference, kind: str = "magnitude") -> sitk.Image:
    """A quality-control image on the grid of ``reference``: displacement magnitude or Jacobian.

    ``magnitude``: length (mm) of the displacement from each voxel to where the transform under
    ``transform_node`` fetches it; ``jacobian``: the determinant of that map's Jacobian (below 0
    means folding; 1 keeps volume).
    """
    if kind not in ("magnitude", "jacobian"):
        raise ValueError(f"kind must be 'magnitude' or 'jacobian', not '{kind}'.")
    grid = grid_from_volume_node(reference)
    ijk_to_ras = LPS_TO_RAS @ grid.index_to_physical_matrix()
    displacement = np.empty((*grid.shape, 3), dtype=np.float32)
    rows = max(1, SLAB_VOXELS // (grid.shape[1] * grid.shape[2]))
    y, x = np.meshgrid(np.arange(grid.shape[1]), np.arange(grid.shape[2]), indexing="ij")
    for z0 in range(0, grid.shape[0], rows):
        z = np.arange(z0, min(z0 + rows, grid.shape[0]))
        index = np.stack(np.broadcast_arrays(x[None], y[None], z[:, None, None]), axis=-1)
        points = index.reshape(-1, 3) @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]
        moved = map_points_through(transform_node, points)
        displacement[z0 : z0 + len(z)] = (moved - points).reshape(len(z), *x.shape, 3)
    if kind == "magnitude":
        values = np.linalg.norm(displacement, axis=-1)
    else:
        # d(displacement)/d(index) per axis (x, y, z), then to physical with the inverse of
        # direction * spacing; the LPS/RAS flip cancels in the determinant.
        gradients = np.stack(
            [np.gradient(displacement, axis=a) for a in (2, 1, 0)], axis=-1
        )  # (z, y, x, 3 components, 3 index axes)
        to_index = np.linalg.inv(ijk_to_ras[:3, :3])
        jacobian = gradients @ to_index + np.eye(3)
        values = np.linalg.det(jacobian)
    return grid.apply_to(sitk.GetImageFromArray(values.astype(np.float32)))
