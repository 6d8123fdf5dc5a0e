"""SAM-deform: the learned diffeomorphic stage.

The pipeline calls ``run`` only when network weights are configured; without weights the stage is
skipped with a logged reason, and the instance optimisation refines the coarse field directly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import DeformConfig
from ..errors import ConfigError
from ..image import WorkingImage


def check_available(config: DeformConfig) -> None:
    """Refuse deform weights before any work: this version has no network to load them into."""
    raise ConfigError(
        f"SAM-deform weights were given ({config.weights}), but this version of the library has "
        "no SAM-deform network to load them into. Remove deform.weights (or pass --stages "
        "affine,coarse,instance) to register without the learned stage."
    )


def run(
    config: DeformConfig,
    fixed: WorkingImage,
    moving: WorkingImage,
    affine: np.ndarray,
    dense: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, dict]:
    check_available(config)
    raise AssertionError("unreachable")
