"""Dense transforms on axis-aligned grids, in torch.

A dense displacement ``u`` is a (1, 3, D, H, W) tensor in LPS millimetres with channels in (x, y, z)
order, sampled on an axis-aligned grid of the fixed image. It maps a fixed point ``p`` to
``p + u(p)`` (the pull/resampling direction, fixed -> moving). Sampling uses ``grid_sample`` with
``align_corners=True``: normalised -1 and +1 are the first and last voxel centres, as in ITK.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .grid import Grid, slab_bounds

DETERMINANT_SLAB_VOXELS = 1_000_000  # voxels per slab of the Jacobian determinant
SPLIT_SAMPLE_POINTS = 65_536  # fewer points are sampled in one batch item (one thread)


def _require_axis_aligned(grid: Grid) -> None:
    if not grid.is_axis_aligned:
        raise ValueError("dense fields live on axis-aligned working grids only")


def physical_to_normalized(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """LPS mm (..., 3) -> grid_sample coordinates (..., 3) in (x, y, z) order, align_corners=True."""
    _require_axis_aligned(grid)
    # One multiply-add per coordinate: on whole working grids the temporaries of the
    # step-by-step formula cost more than the sampling that follows.
    scale = [2.0 / (s * max(n - 1, 1)) for s, n in zip(grid.spacing, grid.size_xyz)]
    shift = [-1.0 - o * k for o, k in zip(grid.origin, scale)]
    return torch.addcmul(points.new_tensor(shift), points, points.new_tensor(scale))


def normalized_scale(grid: Grid) -> torch.Tensor:
    """mm per normalised unit along (x, y, z): half the extent of the grid."""
    return torch.tensor(
        [max(n - 1, 1) * s / 2.0 for n, s in zip(grid.size_xyz, grid.spacing)], dtype=torch.float32
    )


def voxel_points(grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """Physical position of every voxel centre, (1, D, H, W, 3), float32 (x, y, z)."""
    _require_axis_aligned(grid)
    axes = [
        torch.arange(n, dtype=torch.float32, device=device) * s + o
        for n, s, o in zip(grid.shape, grid.spacing[::-1], grid.origin[::-1])
    ]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], dim=-1)[None]


def sample(volume: torch.Tensor, grid: Grid, points: torch.Tensor, mode: str = "bilinear"):
    """Sample a (1, C, D, H, W) volume on ``grid`` at physical points (1, ..., 3) -> (1, C, ...).

    Points outside the grid take the value at the nearest border voxel.
    """
    shape = points.shape[1:-1]
    norm = physical_to_normalized(points, grid).reshape(-1, 3)
    count = norm.shape[0]
    # On a CPU, 3-D grid_sample runs one thread per batch item: split the points over a batch
    # of as many items as threads, all reading the same (expanded, not copied) volume.
    parts = torch.get_num_threads() if volume.device.type == "cpu" else 1
    parts = parts if count >= SPLIT_SAMPLE_POINTS else 1
    if count % parts:
        norm = torch.cat([norm, norm[: parts - count % parts]])
    out = F.grid_sample(
        volume.expand(parts, -1, -1, -1, -1),
        norm.view(parts, -1, 1, 1, 3),
        mode=mode,
        padding_mode="border",
        align_corners=True,
    )
    out = out.transpose(0, 1).reshape(volume.shape[1], -1)[:, :count]
    return out.reshape(1, volume.shape[1], *shape)


def sample_points(volume: torch.Tensor, grid: Grid, points: torch.Tensor) -> torch.Tensor:
    """Sample a (1, C, D, H, W) volume at (N, 3) physical points -> (N, C)."""
    return sample(volume, grid, points[None])[0].T


def apply_affine(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 homogeneous matrix to (..., 3) points."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def resample_field(field: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A displacement field re-sampled (trilinear, border) on another grid."""
    return sample(field, source, voxel_points(target, field.device))


def compose(outer: torch.Tensor, inner: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement of ``(id + outer) o (id + inner)``: u(p) = inner(p) + outer(p + inner(p))."""
    points = voxel_points(grid, inner.device) + inner.permute(0, 2, 3, 4, 1)
    return inner + sample(outer, grid, points)


def pull(
    volume: torch.Tensor,
    volume_grid: Grid,
    affine: torch.Tensor,
    dense: torch.Tensor,
    dense_grid: Grid,
    target: Grid,
    mode: str = "bilinear",
) -> torch.Tensor:
    """A moving-space volume sampled through ``p -> A(p + u(p))`` at the voxels of ``target``.

    ``affine`` is the 4x4 fixed -> moving matrix and ``dense`` the displacement u on ``dense_grid``;
    the result is (1, C, *target.shape), the volume resampled onto the fixed side.
    """
    points = voxel_points(target, dense.device)
    inner = sample(dense, dense_grid, points).permute(0, 2, 3, 4, 1)
    matrix = affine.to(device=dense.device, dtype=points.dtype)
    return sample(volume, volume_grid, apply_affine(matrix, points + inner), mode)


def integrate_velocity(velocity: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: the displacement of exp(v) for a stationary velocity field (mm)."""
    disp = velocity / (2.0**steps)
    for _ in range(steps):
        disp = compose(disp, disp, grid)
    return disp


def jacobian_determinant(field: torch.Tensor, grid: Grid) -> torch.Tensor:
    """det(I + grad u) by central differences (one-sided at the borders), (D, H, W) float64.

    Computed in slabs of z-slices, each with one neighbouring slice on either side, so that the
    float64 temporaries (about 300 bytes a voxel) stay small on large grids; the values are those
    of the whole field at once.
    """
    depth = field.shape[2]
    out = torch.empty(field.shape[2:], dtype=torch.float64, device=field.device)
    for z0, z1 in slab_bounds(field.shape, DETERMINANT_SLAB_VOXELS):
        lo, hi = max(z0 - 1, 0), min(z1 + 1, depth)
        out[z0:z1] = _jacobian_determinant(field[0, :, lo:hi], grid.spacing)[z0 - lo : z1 - lo]
    return out


def _jacobian_determinant(u: torch.Tensor, spacing: tuple[float, ...]) -> torch.Tensor:
    u = u.double()
    grads = []  # grads[j][i] = d u_i / d x_j
    for dim, step in zip((3, 2, 1), spacing):  # d/dx, d/dy, d/dz over (z, y, x) axes
        if u.shape[dim] < 2:
            grads.append(torch.zeros_like(u))
        else:
            grads.append(torch.gradient(u, spacing=step, dim=dim)[0])
    (a, d, g), (b, e, h), (c, f, i) = grads  # the rows of J - I: (a b c), (d e f), (g h i)
    a, e, i = a + 1.0, e + 1.0, i + 1.0
    # Expanded along the first row: elementwise, where a batched linalg.det of 3x3 matrices is
    # several times slower on a CPU.
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def folding_percent(
    field: torch.Tensor, grid: Grid, mask: np.ndarray | None = None, sign: float = 1.0
) -> float:
    """Share of voxels (inside ``mask`` when given) where the map folds (det J <= 0), in %.

    ``sign`` is that of an affine applied after the field (its determinant's), which flips
    orientation everywhere.
    """
    det = jacobian_determinant(field, grid).cpu().numpy() * sign
    if mask is not None:
        det = det[mask]
    return float((det <= 0).mean() * 100.0) if det.size else 0.0


def unfold(
    field: torch.Tensor, grid: Grid, passes: int, sign: float = 1.0, margin: int = 2
) -> tuple[torch.Tensor, int]:
    """Smooth ``field`` locally where the map folds, until it no longer does or ``passes`` run out.

    Each pass replaces the displacement within ``margin`` voxels of every folded voxel
    (det J <= 0, times ``sign`` as in ``folding_percent``) by two rounds of 3x3x3 box means;
    elsewhere the field is left exactly as it was. The determinant is computed on the whole grid once, then only
    in boxes around clusters of folds: a pass changes the field within ``margin`` of a fold, so
    the determinant can change only one voxel further. Returns the field and the number of passes
    that changed it (``passes`` if folds remain).
    """
    field = field.clone()
    folded = jacobian_determinant(field, grid) * sign <= 0
    pad = margin + 2  # the box faces stay two voxels clear of every changed voxel
    for done in range(passes):
        if not bool(folded.any()):
            return field, done
        for box in _fold_boxes(folded, pad):
            where = (slice(None), slice(None), *box)
            sub = field[where]
            inside = folded[box][None, None].float()
            region = _dilate(inside, margin)[0, 0] > 0
            field[where] = torch.where(region, smooth(sub, 2), sub)
            # Faces of the box inside the grid get one-sided differences: keep their old value.
            det = jacobian_determinant(field[where], grid) * sign <= 0
            trusted = tuple(
                slice(1 if b.start > 0 else 0, -1 if b.stop < n else None)
                for b, n in zip(box, folded.shape)
            )
            folded[box][trusted] = det[trusted]
    return field, passes


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over the (2 radius + 1)^3 cube around each voxel, one axis at a time (the cube's max
    is the max of its axes', at a fraction of the cost of one 3-D window)."""
    for axis in range(3):
        size, pad = [1, 1, 1], [0, 0, 0]
        size[axis], pad[axis] = 2 * radius + 1, radius
        mask = F.max_pool3d(mask, size, 1, pad)
    return mask


FOLD_TILE = 16  # voxels per side of the tiles whose connected groups make the boxes of unfold


def _fold_boxes(folded: torch.Tensor, pad: int) -> list[tuple[slice, slice, slice]]:
    """Boxes (z, y, x slices) around the connected groups of tiles holding folded voxels."""
    tiles = F.max_pool3d(folded[None, None].float(), FOLD_TILE, FOLD_TILE, ceil_mode=True)[0, 0]
    occupied = tiles > 0
    labels = torch.arange(1, occupied.numel() + 1, dtype=torch.float32).view(occupied.shape)
    labels = labels * occupied
    while True:  # each group takes the largest label in it (26-connected)
        spread = F.max_pool3d(labels[None, None], 3, 1, 1)[0, 0] * occupied
        if torch.equal(spread, labels):
            break
        labels = spread
    boxes = []
    for label in labels.unique()[1:] if occupied.any() else []:
        cells = (labels == label).nonzero()
        first, last = cells.min(0).values.tolist(), cells.max(0).values.tolist()
        boxes.append(
            tuple(
                slice(max(f * FOLD_TILE - pad, 0), min((t + 1) * FOLD_TILE + pad, n))
                for f, t, n in zip(first, last, folded.shape)
            )
        )
    return boxes


def smooth(field: torch.Tensor, passes: int, kernel: int = 3) -> torch.Tensor:
    """Repeated box filtering (replicate borders): a cheap Gaussian-like smoother.

    Each pass is the cube's mean taken one axis at a time, as sums of shifted copies: with
    replicate borders the cube is the product of its axes, and on a CPU the shifted sums (and
    their gradients) cost a fraction of a 3-D pooling window.
    """
    for _ in range(passes):
        field = box_mean(field, kernel)
    return field


def box_mean(field: torch.Tensor, kernel: int, border: str = "replicate") -> torch.Tensor:
    """Mean over the ``kernel``-voxel cube around each voxel of a (N, C, D, H, W) tensor.

    ``border``: "replicate" repeats the border voxel beyond the ends; "shrink" averages over the
    part of the cube inside the volume (as ``avg_pool3d`` with ``count_include_pad=False``).
    """
    if border not in ("replicate", "shrink"):
        raise ValueError(f"border must be 'replicate' or 'shrink', not {border!r}")
    for axis in (2, 3, 4):
        field = _BoxAlong.apply(field, axis, kernel, border)
    return field


class _BoxAlong(torch.autograd.Function):
    """Mean over ``kernel`` neighbours along one axis, with its adjoint as the gradient.

    Autograd through the shifted sums would allocate and fill a padded array per term; the
    adjoint is itself a few shifted sums.
    """

    @staticmethod
    def forward(ctx, field: torch.Tensor, axis: int, kernel: int, border: str) -> torch.Tensor:
        ctx.axis, ctx.kernel, ctx.border = axis, kernel, border
        if border == "replicate":
            return _shifted_sum(field, axis, kernel, "replicate").div_(kernel)
        return _shifted_sum(field, axis, kernel, "zeros").div_(_window_counts(field, axis, kernel))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        axis, kernel = ctx.axis, ctx.kernel
        if ctx.border == "shrink":
            weighted = grad / _window_counts(grad, axis, kernel)
            return _shifted_sum(weighted, axis, kernel, "zeros"), None, None, None
        out = _shifted_sum(grad, axis, kernel, "zeros").div_(kernel)
        # Output j < pad read the first voxel (pad - j) extra times through the padding; the
        # last voxel likewise from the other end.
        n, pad = grad.shape[axis], kernel // 2
        for j in range(min(pad, n)):
            out.narrow(axis, 0, 1).add_(grad.narrow(axis, j, 1), alpha=(pad - j) / kernel)
            out.narrow(axis, n - 1, 1).add_(
                grad.narrow(axis, n - 1 - j, 1), alpha=(pad - j) / kernel
            )
        return out, None, None, None


def _shifted_sum(field: torch.Tensor, axis: int, kernel: int, padding: str) -> torch.Tensor:
    """Sum over ``kernel`` neighbours along one axis; beyond the ends the border voxel
    ("replicate") or zero ("zeros")."""
    n, pad = field.shape[axis], kernel // 2
    widths = [0] * 6  # F.pad lists the last axis first
    widths[2 * (4 - axis) : 2 * (5 - axis)] = [pad, pad]
    padded = (
        F.pad(field, widths, mode="replicate") if padding == "replicate" else F.pad(field, widths)
    )
    total = padded.narrow(axis, 0, n).clone()
    for shift in range(1, kernel):
        total += padded.narrow(axis, shift, n)  # in place: one array per pass, not one per term
    return total


def _window_counts(field: torch.Tensor, axis: int, kernel: int) -> torch.Tensor:
    """How many of the ``kernel`` neighbours along ``axis`` lie inside the volume, broadcastable."""
    n, pad = field.shape[axis], kernel // 2
    index = torch.arange(n, device=field.device)
    count = (index + pad).clamp(max=n - 1) - (index - pad).clamp(min=0) + 1
    shape = [1] * field.dim()
    shape[axis] = n
    return count.view(shape).to(field.dtype)


def roughness(field: torch.Tensor, mean_over_axes: bool = False) -> torch.Tensor:
    """Mean squared forward difference of a (1, C, D, H, W) field along each axis, summed.

    With ``mean_over_axes`` the per-axis terms are averaged instead of summed.
    """
    terms = [field.diff(dim=d).pow(2).mean() for d in (2, 3, 4) if field.shape[d] > 1]
    if not terms:
        return field.new_zeros(())
    return torch.stack(terms).mean() if mean_over_axes else sum(terms[1:], terms[0])
