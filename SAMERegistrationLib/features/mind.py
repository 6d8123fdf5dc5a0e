"""MIND-SSC (Heinrich et al., 2013): hand-crafted self-similarity features that need no weights.

The local map is MIND-SSC of the working image; the global map is MIND-SSC of the image smoothed and
subsampled 4x, which describes a larger context. Both are centred per voxel and L2-normalised so that
cosine similarity compares patterns rather than overall brightness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import spatial
from ..working import AIR_HU, WorkingImage
from .base import FeatureMaps, feature_grid_and_mask, unit

# The six neighbours of the centre of a 3x3x3 patch, and the 12 pairs of them sqrt(2) apart.
_SIX = [(0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1)]
_PAIRS = [
    (a, b)
    for i, a in enumerate(_SIX)
    for b in _SIX[i + 1 :]
    if sum((p - q) ** 2 for p, q in zip(a, b)) == 2
]


def _shifted(image: torch.Tensor, offset: tuple[int, int, int], dilation: int) -> torch.Tensor:
    """``image`` shifted by (offset - 1) * dilation voxels, borders replicated."""
    pad = dilation
    padded = F.pad(image, (pad,) * 6, mode="replicate")
    d, h, w = image.shape[2:]
    z, y, x = (o * dilation for o in offset)
    return padded[:, :, z : z + d, y : y + h, x : x + w]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC of a (1, 1, D, H, W) image -> (1, 12, D, H, W) with values in (0, 1].

    Computed in place on one 12-channel array: at the working resolution of a large scan each
    such array takes hundreds of megabytes.
    """
    ssd = image.new_empty((image.shape[0], len(_PAIRS), *image.shape[2:]))
    for channel, (a, b) in enumerate(_PAIRS):
        torch.sub(
            _shifted(image, a, dilation),
            _shifted(image, b, dilation),
            out=ssd[:, channel : channel + 1],
        )
    ssd = spatial.smooth(ssd.square_(), passes=1, kernel=2 * radius + 1)
    ssd -= ssd.min(dim=1, keepdim=True).values
    variance = ssd.mean(dim=1, keepdim=True)
    mean_var = variance.mean()
    variance.clamp_(mean_var * 1e-3, mean_var * 1e3)
    mind = ssd.div_(variance).neg_().exp_()
    return mind.div_(mind.max(dim=1, keepdim=True).values)


class MindExtractor:
    """MIND-SSC features behind the common interface."""

    name = "mind"

    def __init__(
        self, device: torch.device | str = "cpu", dilation: int = 2, fine: bool = False
    ) -> None:
        self.device = torch.device(device)
        self.dilation = dilation
        self.fine = fine  # also compute FeatureMaps.fine (instance optimisation reads it)

    @torch.no_grad()
    def extract(self, image: WorkingImage) -> FeatureMaps:
        grid, body = feature_grid_and_mask(image)
        hu = torch.as_tensor(image.hu, device=self.device)
        inside = torch.as_tensor(image.body, device=self.device)
        scaled = torch.where(inside, hu, torch.full_like(hu, AIR_HU)).clamp(-1024, 2000) / 1000.0
        scaled = scaled[None, None]

        # Fine: MIND at the working resolution (4 mm offsets at the default 2 mm grid), averaged
        # over 3x3x3 voxels onto the feature grid, as ConvexAdam's instance optimisation uses it.
        fine = None
        if self.fine:
            fine = mind_ssc(scaled, dilation=self.dilation)
            fine = _centred_unit(F.avg_pool3d(fine, 3, 2, 1, count_include_pad=False))
        # Local: MIND of the image smoothed and subsampled to the feature grid (4 mm offsets at the
        # default 2 mm working grid); global: the same at twice that scale with twice the offsets.
        half = spatial.smooth(scaled, passes=1)[:, :, ::2, ::2, ::2]
        local = spatial.smooth(mind_ssc(half, dilation=max(self.dilation // 2, 1)), passes=1)
        quarter = spatial.smooth(half, passes=1)[:, :, ::2, ::2, ::2]
        global_ = mind_ssc(quarter, dilation=self.dilation)
        global_ = spatial.sample(
            global_, grid.downsampled(2), spatial.voxel_points(grid, self.device)
        )
        return FeatureMaps(_centred_unit(local), _centred_unit(global_), grid, body, fine)


def _centred_unit(features: torch.Tensor) -> torch.Tensor:
    return unit(features - features.mean(dim=1, keepdim=True)).contiguous()
