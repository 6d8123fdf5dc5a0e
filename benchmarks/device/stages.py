"""The kit's one adapter to the library's registration stages (every call into them is here).

It runs the pipeline's steps on two images already on their working grids (``pipeline.pre_align``
starts from SimpleITK images, which the device has not), in the pipeline's order and with its
settings: features, initial translation search, matching, then each stage's
``run(fixed_maps, moving_maps, alignment, config, context)``, each timed on its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from SAMERegistrationLib.alignment import Alignment
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.evaluate import dice_per_label, mean_dice
from SAMERegistrationLib.features import make_extractor
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.matching import find_matches
from SAMERegistrationLib.stages import StageContext, deform, initial
from SAMERegistrationLib.stages.loop import RUNNERS
from SAMERegistrationLib.working import WorkingImage

#: Stage names in the order they run; each is timed on its own.
STAGES = ("features", "initial", "matching", "affine", "coarse", "deform", "instance")
#: The timed variants: the default pipeline (MIND-SSC, every stage; the shipped SAM-deform
#: network fits MIND at 2 mm) and SAM features with the shipped SAM model up to the coarse stage.
VARIANTS: dict[str, dict[str, Any]] = {
    "mind": {"features": "mind", "stages": ("affine", "coarse", "deform", "instance")},
    "sam": {"features": "sam", "stages": ("affine", "coarse")},
}

#: ``section(name)`` returns a context manager timing the work inside it as stage ``name``.
Section = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def untimed(name: str) -> Iterator[None]:
    yield


@dataclass
class Models:
    """What a variant loads once and reuses for every pair."""

    config: RegistrationConfig
    extractor: Any
    network: Any  # the SAM-deform network, or None when the variant or the features skip it
    deform_note: str


def working_image(hu: np.ndarray, body: np.ndarray, spacing, origin, direction) -> WorkingImage:
    grid = Grid(hu.shape, tuple(spacing), tuple(origin), np.asarray(direction))
    return WorkingImage(np.ascontiguousarray(hu, np.float32), body.astype(bool), grid)


def load_models(variant: str, device: torch.device) -> Models:
    settings = VARIANTS[variant]
    stages = settings["stages"]
    config = RegistrationConfig(features=settings["features"], device=str(device))
    config = config.with_overrides({f"{s}.enabled": s in stages for s in STAGES[3:]})
    extractor = make_extractor(config, device)
    config = config.resolved_for(extractor.name)
    network, note = None, "not in this variant"
    if config.deform.enabled:
        network, note = deform.choose_model(
            config.deform,
            extractor.name,
            getattr(extractor, "weights", None),
            config.working_spacing_mm,
            device,
        )
    return Models(config, extractor, network, note)


@dataclass
class PairRun:
    after: dict[str, Alignment] = field(default_factory=dict)  # after affine/coarse/deform/...
    info: dict[str, dict] = field(default_factory=dict)


def register_working(
    fixed: WorkingImage,
    moving: WorkingImage,
    models: Models,
    device: torch.device,
    section: Section = untimed,
) -> PairRun:
    """Every enabled stage on one pair; ``section`` times each. Raises what the stages raise."""
    config, run = models.config, PairRun()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    context = StageContext(
        fixed=fixed,
        moving=moving,
        device=device,
        deform_model=models.network,
        deform_source=models.deform_note,
    )
    with section("features"):
        fixed_maps = models.extractor.extract(fixed)
        moving_maps = models.extractor.extract(moving)
    alignment = Alignment.identity(fixed.grid, device)
    with section("initial"):
        alignment, run.info["initial"] = initial.run(
            fixed_maps, moving_maps, alignment, config, context
        )
    with section("matching"):
        context.matches = find_matches(
            fixed_maps, moving_maps, config.matching, alignment.affine,
            config.matching.search_radius_mm, device,
        )  # fmt: skip
    run.info["matching"] = context.matches.summary()
    for name in STAGES[3:]:
        if not getattr(config, name).enabled or (name == "deform" and models.network is None):
            continue
        with section(name):
            alignment, run.info[name] = RUNNERS[name](
                fixed_maps, moving_maps, alignment, config, context
            )
        run.after[name] = alignment
    return run


def warped_labels(
    moving_labels: np.ndarray, moving_grid: Grid, alignment: Alignment, fixed_grid: Grid
) -> np.ndarray:
    """The moving label map pulled (nearest) through the map onto the fixed working grid."""
    device = alignment.field.device
    volume = torch.as_tensor(moving_labels.astype(np.float32), device=device)[None, None]
    pulled = alignment.pull(volume, moving_grid, fixed_grid, "nearest")
    return pulled[0, 0].round().to(torch.uint8).cpu().numpy()


def mean_dice_after(
    fixed_labels: np.ndarray,
    moving_labels: np.ndarray,
    moving_grid: Grid,
    alignment: Alignment,
    fixed_grid: Grid,
) -> float:
    """Mean Dice on the fixed working grid over the organs present in both label maps."""
    present = sorted(set(np.unique(fixed_labels)) & set(np.unique(moving_labels)) - {0})
    warped = warped_labels(moving_labels, moving_grid, alignment, fixed_grid)
    return mean_dice(dice_per_label(fixed_labels, warped, present))
