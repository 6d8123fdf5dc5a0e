"""The kit's one adapter to the library's registration stages (every call into them is here).

It runs the pipeline's steps on two images already on their working grids (``pipeline.pre_align``
starts from SimpleITK images, which the device has not), in the pipeline's order and with its
settings: features, initial translation search, matching, affine (with the feature type's
re-matching passes), coarse, deform, instance. When the stages share one signature
(``run(fixed_maps, moving_maps, alignment, config) -> (alignment, info)``), ``register_working``
becomes a loop over them and nothing else in the kit changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from SAMERegistrationLib import spatial
from SAMERegistrationLib.config import RegistrationConfig
from SAMERegistrationLib.evaluate import dice_per_label, mean_dice
from SAMERegistrationLib.features import make_extractor
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.image import WorkingImage
from SAMERegistrationLib.matching import find_matches
from SAMERegistrationLib.stages import deform
from SAMERegistrationLib.stages.affine import fit_affine
from SAMERegistrationLib.stages.coarse import fit_coarse
from SAMERegistrationLib.stages.initial import search_translation
from SAMERegistrationLib.stages.instance import optimise_instance

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
class Alignment:
    """The map ``p -> A (p + dense(p))`` after a stage (dense on the fixed working grid)."""

    affine: np.ndarray
    dense: torch.Tensor


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
    with section("features"):
        fixed_maps = models.extractor.extract(fixed)
        moving_maps = models.extractor.extract(moving)
    with section("initial"):
        prior, run.info["initial"] = search_translation(fixed_maps, moving_maps)
    with section("matching"):
        matches = find_matches(
            fixed_maps,
            moving_maps,
            config.matching,
            prior,
            config.matching.search_radius_mm,
            device,
        )
    run.info["matching"] = matches.summary()
    affine = prior
    if config.affine.enabled:
        with section("affine"):
            affine, info = fit_affine(matches, config.affine)
            for radius in config.affine.refine_radii_mm:
                matches = find_matches(
                    fixed_maps, moving_maps, config.matching, affine, radius, device
                )
                affine, info = fit_affine(matches, config.affine)
        run.info["affine"] = info
    grid = fixed.grid
    dense = torch.zeros((1, 3, *grid.shape), device=device)
    run.after["affine"] = Alignment(affine, dense)
    if config.coarse.enabled:
        with section("coarse"):
            coarse_matches = matches
            if config.coarse.rematch_radius_mm:
                coarse_matches = find_matches(
                    fixed_maps, moving_maps, config.matching, affine,
                    config.coarse.rematch_radius_mm, device,
                )  # fmt: skip
            coarse, coarse_grid, run.info["coarse"] = fit_coarse(
                coarse_matches, affine, grid, config.coarse, device
            )
            dense = spatial.resample_field(coarse, coarse_grid, grid)
        run.after["coarse"] = Alignment(affine, dense)
    if models.network is not None:
        with section("deform"):
            dense, run.info["deform"] = deform.apply_deform(
                models.network, fixed, moving, fixed_maps, moving_maps, affine, dense
            )
        run.after["deform"] = Alignment(affine, dense)
    if config.instance.enabled:
        with section("instance"):
            dense, run.info["instance"] = optimise_instance(
                fixed_maps, moving_maps, affine, dense, grid, config.instance
            )
        run.after["instance"] = Alignment(affine, dense)
    return run


def warped_labels(
    moving_labels: np.ndarray, moving_grid: Grid, alignment: Alignment, fixed_grid: Grid
) -> np.ndarray:
    """The moving label map pulled (nearest) through the map onto the fixed working grid."""
    dense = alignment.dense
    volume = torch.as_tensor(moving_labels.astype(np.float32), device=dense.device)[None, None]
    matrix = torch.as_tensor(alignment.affine, dtype=torch.float32)
    pulled = spatial.pull(volume, moving_grid, matrix, dense, fixed_grid, fixed_grid, "nearest")
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
