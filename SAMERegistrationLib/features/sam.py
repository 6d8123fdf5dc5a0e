"""SAM embeddings behind the common feature interface."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import spatial
from ..errors import CheckpointError
from ..grid import Grid
from ..shipped import MODELS, read_record, verify_shipped
from ..working import WorkingImage, sam_intensity
from .base import FeatureMaps, unit
from .sam_network import GLOBAL_STRIDE, LOCAL_STRIDE, load_sam_checkpoint

DEFAULT_WEIGHTS = MODELS / "sam_default.pt"
#: The shipped model's record: its SHA256 and how it was trained (the model card has the rest).
DEFAULT_RECORD = MODELS / "sam_default.json"


def default_weights() -> Path | None:
    """The SAM model shipped with the library, if this installation has it."""
    return DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None


def shipped_model_preferred() -> bool:
    """Whether ``features=auto`` should use the shipped model: its record says so when the
    evaluation found it better than MIND-SSC (see the model card)."""
    if default_weights() is None:
        return False
    return bool(read_record(DEFAULT_RECORD).get("preferred_for_auto", False))


def verify_shipped_weights(
    weights: str | os.PathLike = DEFAULT_WEIGHTS, record: str | os.PathLike = DEFAULT_RECORD
) -> str:
    """Check the shipped SAM weights against the SHA256 in their record; return the hash."""
    return verify_shipped(weights, record, "SAM model", "pass --weights PATH/TO/SAM.pth")


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
        if self.weights.resolve() == DEFAULT_WEIGHTS.resolve():
            verify_shipped_weights(self.weights)
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
