"""SAM-deform: the learned diffeomorphic stage, run after the affine and coarse stages.

The network sees the fixed image, the moving image pulled through the pre-alignment
``phi_pre(p) = A(p + u_coarse(p))`` and the SAM correlation of the two, and predicts a field u on
the fixed working grid. The stage's map is ``phi_pre o (id + u)``: u moves fixed points first, then
the pre-alignment carries them into moving space, so the total displacement becomes
``u(p) + u_coarse(p + u(p))`` with the affine still applied last. Without network weights the
pipeline skips this stage with a logged reason.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .. import spatial
from ..config import DeformConfig
from ..deform.checkpoint import DeformModel, load_deform_weights
from ..deform.field import displacement
from ..deform.inputs import build_inputs
from ..errors import ConfigError
from ..features.base import FeatureMaps
from ..features.sam import file_sha256
from ..image import WorkingImage

log = logging.getLogger(__name__)


def load_model(
    config: DeformConfig,
    features: str,
    sam_weights: str | os.PathLike[str] | None,
    working_spacing_mm: float,
    device: torch.device,
) -> DeformModel:
    """Load and check the network before any work: a bad file or a mismatch stops registration."""
    model = load_deform_weights(config.weights, map_location=device)
    if model.correlation and model.features != features:
        raise ConfigError(
            f"The SAM-deform weights {config.weights} were trained with {model.features} "
            f"features as the correlation input, but this registration uses {features} features. "
            f"Register with --features {model.features}, or use weights trained with {features}."
        )
    trained_sam = model.sam_weights_sha256 if model.features == "sam" else None
    if trained_sam and sam_weights is not None and file_sha256(sam_weights) != trained_sam:
        log.warning(
            "The SAM-deform weights %s were trained with another SAM model than %s; its "
            "correlation input may not mean what the network learnt.",
            config.weights,
            sam_weights,
        )
    trained = model.working_spacing_mm
    if trained is not None and not np.isclose(trained, working_spacing_mm):
        log.warning(
            "The SAM-deform weights %s were trained on a %g mm working grid; registering on %g mm.",
            config.weights,
            trained,
            working_spacing_mm,
        )
    return model


def apply_deform(
    model: DeformModel,
    fixed: WorkingImage,
    moving: WorkingImage,
    fixed_maps: FeatureMaps,
    moving_maps: FeatureMaps,
    affine: np.ndarray,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """The displacement of ``phi_pre o (id + u)`` on the fixed working grid, and diagnostics."""
    device = dense.device
    inputs = build_inputs(fixed, moving, fixed_maps, moving_maps, affine, dense, model.correlation)
    with torch.no_grad(), torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
        output = model.network(inputs.moving, inputs.fixed, inputs.correlation)
    with torch.no_grad():
        u = displacement(output.float(), fixed.grid, model.variant, model.integration_steps)
        composed = spatial.compose(dense, u, fixed.grid)
    info = {
        "variant": model.variant,
        "correlation": model.correlation,
        "network_features": model.features,
        "displacement_max_mm": round(float(u.norm(dim=1).max()), 3),
        # Folding of the network's own map (id + u) inside the fixed body.
        "folding_percent": spatial.folding_percent(u, fixed.grid, fixed.body),
    }
    return composed, info
