"""The SAME++ stages, one per module, each ``run(fixed_maps, moving_maps, alignment, config)``.

A stage takes the pair's feature maps, the current ``Alignment`` and the ``RegistrationConfig``,
and returns the next Alignment with a report (``info``, JSON-ready; ``status`` "skipped" with a
``reason`` when the stage had nothing to do). What a stage needs beyond that (the working images,
the matches, the deform network, progress) comes in a ``StageContext``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..grid import Grid
from ..matching import Matches
from ..working import WorkingImage

# progress(stage, done, total): called as each stage advances.
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class StageContext:
    fixed: WorkingImage | None = None
    moving: WorkingImage | None = None
    matches: Matches | None = None  # the latest correspondences; affine and coarse renew them
    device: torch.device | str = "cpu"
    deform_model: Any = None  # a loaded SAM-deform network (``stages.deform.choose_model``)
    deform_source: str = "disabled"  # where that network came from, or why there is none
    progress: ProgressCallback | None = None
    # The coarse stage's own field (mm) and its control grid: a compact form to store.
    coarse: tuple[torch.Tensor, Grid] | None = None
    # A rigid fixed -> moving pose from HU (``initial_pose``) that checks the initial translation.
    pose: np.ndarray | None = None
    pose_start: np.ndarray | None = None  # the same pose however weak its fit: a fallback start

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)


def seconds_since(start: float) -> float:
    """Seconds since ``start`` (a ``time.perf_counter`` reading), for a stage's report."""
    return round(time.perf_counter() - start, 3)


def skipped(reason: str, detail: str | None = None) -> dict:
    info = {"status": "skipped", "reason": reason}
    if detail:
        info["detail"] = detail
    return info
