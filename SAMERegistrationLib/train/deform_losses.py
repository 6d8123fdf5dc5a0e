"""The SAM-deform training objective: image similarity + SAM feature similarity + smoothness.

- similarity: local NCC (``lncc``, SAME's cov^2 / (var var + 1e-5) over a cubic window) or global
  NCC (``ncc``), averaged over the voxels where the warped moving body mask exceeds 0.8;
- SAM loss: 1 - cosine between the fixed embeddings and the moving embeddings pulled through the
  whole map, averaged over the fixed body on the feature grid;
- smoothness: squared forward differences of the network's output (voxels), averaged per axis
  (``spatial.roughness``).
"""

from __future__ import annotations

import torch

from ..spatial import box_mean

SIMILARITIES = ("lncc", "ncc")
MASK_LEVEL = 0.8


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def local_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Mean squared local correlation of two (1, 1, D, H, W) images inside ``mask``, in [0, 1]."""

    def box(x: torch.Tensor) -> torch.Tensor:
        # Windows are cut at the image border, as avg_pool3d with count_include_pad=False.
        return box_mean(x, window, border="shrink")

    mean_a, mean_b = box(a), box(b)
    cov = box(a * b) - mean_a * mean_b
    var_a = (box(a * a) - mean_a**2).clamp_min(0)
    var_b = (box(b * b) - mean_b**2).clamp_min(0)
    return masked_mean(cov**2 / (var_a * var_b + 1e-5), mask)


def global_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of the voxels inside ``mask``, in [-1, 1]."""
    inside = mask.bool()
    x, y = a[inside], b[inside]
    x, y = x - x.mean(), y - y.mean()
    return (x * y).mean() / (x.pow(2).mean().sqrt() * y.pow(2).mean().sqrt() + 1e-6)


def similarity_loss(
    fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor, kind: str, window: int
) -> torch.Tensor:
    """1 - similarity, so 0 is a perfect match."""
    if kind == "lncc":
        return 1.0 - local_ncc(fixed, warped, mask, window)
    if kind == "ncc":
        return 1.0 - global_ncc(fixed, warped, mask)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, not {kind!r}")
