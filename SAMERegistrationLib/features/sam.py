"""SAM embeddings behind the common feature interface."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import spatial
from ..errors import CheckpointError
from ..grid import Grid
from ..image import WorkingImage, sam_intensity
from .base import FeatureMaps, unit
from .sam_network import GLOBAL_STRIDE, LOCAL_STRIDE, load_sam_checkpoint

MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_WEIGHTS = MODELS / "sam_default.pt"


def default_weights() -> Path | None:
    """The SAM model shipped with the library, if this installation has it."""
    return DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None


class SamExtractor:
    """Runs the SAM network on the working image and returns its two embedding maps."""

    name = "sam"

    def __init__(self, weights: str | os.PathLike | None, device: torch.device) -> None:
        if weights is None:
            raise CheckpointError(
                "SAM features were requested but no SAM weights were given and none ship with "
                "this installation. Pass --weights PATH/TO/SAM.pth, or use --features mind."
            )
        self.weights = Path(weights)
        self.device = torch.device(device)
        self.network = load_sam_checkpoint(self.weights).to(self.device).eval()

    @torch.no_grad()
    def extract(self, image: WorkingImage) -> FeatureMaps:
        x = torch.as_tensor(sam_intensity(image.hu, image.body), device=self.device)[None, None]
        local, global_ = self.network(x)
        local_grid = _map_grid(image.grid, local.shape[2:], LOCAL_STRIDE)
        global_grid = _map_grid(image.grid, global_.shape[2:], GLOBAL_STRIDE)
        global_ = spatial.sample(
            global_, global_grid, spatial.voxel_points(local_grid, self.device)
        )
        body = image.body[::2, ::2, ::2].copy()
        return FeatureMaps(local.contiguous(), unit(global_).contiguous(), local_grid, body)


def _map_grid(working: Grid, shape, stride_zyx: tuple[int, int, int]) -> Grid:
    """Where the network's output voxels sit: (stride * i) in-plane, (stride * i + 0.5) in z."""
    spacing = tuple(s * k for s, k in zip(working.spacing, stride_zyx[::-1]))
    origin = (working.origin[0], working.origin[1], working.origin[2] + 0.5 * working.spacing[2])
    return Grid(tuple(shape), spacing, origin, working.direction)
