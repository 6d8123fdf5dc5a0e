"""A CT on its working grid, and the intensity scalings the networks and losses read.

Numpy only: the core (features, matching, stages) works on these arrays; reading files and
resampling onto the working grid happen in ``image`` (SimpleITK).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grid import Grid

AIR_HU = -1024.0


@dataclass
class WorkingImage:
    """A CT on its working grid: HU values, a body mask, and the grid geometry."""

    hu: np.ndarray  # float32 (z, y, x)
    body: np.ndarray  # bool (z, y, x)
    grid: Grid


def sam_intensity(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """SAM's input scaling: HU clipped to [-1024, 3071], mapped to [0, 255], minus 50; air outside."""
    scaled = (np.clip(hu, -1024.0, 3071.0) + 1024.0) * (255.0 / 4095.0) - 50.0
    return np.where(body, scaled, -50.0).astype(np.float32)


def window_intensity(hu: np.ndarray, low: float = -800.0, high: float = 400.0) -> np.ndarray:
    """HU window mapped to [-1, 1] (the soft-tissue channel SAME feeds intensity losses)."""
    return ((np.clip(hu, low, high) - low) / (high - low) * 2.0 - 1.0).astype(np.float32)
