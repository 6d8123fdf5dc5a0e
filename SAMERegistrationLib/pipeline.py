"""``register``: the SAME++ stages from two CT images to one RegistrationResult.

The stages run in order on one ``Alignment``: initial (a translation), matching, affine, coarse,
deform and instance; each is ``run(fixed_maps, moving_maps, alignment, config, context)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .alignment import Alignment
from .config import STEPS, RegistrationConfig
from .device import describe_device, memory_guard, resolve_device
from .errors import RegistrationFailed
from .evaluate import dice_per_label, mean_dice
from .features import FeatureExtractor, FeatureMaps, make_extractor
from .grid import Grid
from .image import ImageLike, check_ct, check_labels, read_image, to_working_grid
from .initial_pose import find_initial_pose
from .matching import Matches, find_matches, with_model_threshold
from .result import RegistrationResult
from .stages import (
    ProgressCallback,
    StageContext,
    deform,
    fallback,
    initial,
    seconds_since,
    skipped,
)
from .stages.loop import run_stages
from .working import WorkingImage

log = logging.getLogger(__name__)

__all__ = ["STEPS", "ProgressCallback", "register", "pre_align"]


def register(
    fixed: ImageLike,
    moving: ImageLike,
    config: RegistrationConfig | None = None,
    fixed_labels: ImageLike | None = None,
    moving_labels: ImageLike | None = None,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (paths or SimpleITK images).

    Keyword overrides set configuration keys, dots written as double underscores:
    ``register(f, m, features="mind", coarse__iterations=200)``.
    """
    config = config or RegistrationConfig()
    if overrides:
        config = config.with_overrides({k.replace("__", "."): v for k, v in overrides.items()})
    config.validate()
    clock = time.perf_counter()
    fixed_image = check_ct(read_image(fixed, "fixed image"), "fixed image")
    moving_image = check_ct(read_image(moving, "moving image"), "moving image")
    labels = {}
    for name, source, image in (
        ("fixed", fixed_labels, fixed_image),
        ("moving", moving_labels, moving_image),
    ):
        if source is not None:
            labels[name] = check_labels(
                read_image(source, f"{name} label map"), image, f"{name} label map"
            )
    device = resolve_device(config.device)
    extractor = make_extractor(config, device)
    config = with_model_threshold(config, getattr(extractor, "weights", None))
    config = resolved(config, extractor.name)
    context = StageContext(device=device, progress=progress)
    if config.deform.enabled:
        context.deform_model, context.deform_source = deform.choose_model(
            config.deform,
            extractor.name,
            getattr(extractor, "weights", None),
            config.working_spacing_mm,
            device,
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    # The rigid pose from HU; later stages see the moving image re-oriented when it is rotated.
    pose = find_initial_pose(fixed_image, moving_image, config.initial_pose, config.keeps_placement)
    moving_image = pose.moving
    clock += pose.info.get("seconds", 0.0)  # "prepare" times the reading and checks only

    with memory_guard(device, config.working_spacing_mm):
        pre = pre_align(
            fixed_image,
            moving_image,
            config,
            extractor,
            device,
            context,
            clock,
            pose.prior,
            pose.start,
        )
        stages = {"initial_pose": pose.info, **pre.stages}
        alignment = run_stages(("deform", "instance"), pre.fixed_maps, pre.moving_maps,
                               pre.alignment, config, context, stages)  # fmt: skip

    clock = time.perf_counter()
    matches = pre.matches
    matches.moving = pose.to_original(matches.moving)
    result = RegistrationResult(
        fixed_grid=Grid.from_sitk(fixed_image),
        alignment=alignment.with_affine(pose.compose(alignment.affine)),
        matches=matches,
        config=config,
        device=describe_device(device),
        stages=stages,
        fixed_features=pre.fixed_maps,
        moving_features=pre.moving_maps,
    )
    result.warnings = pose.warnings + pre.warnings + pose.final_warnings(result.affine)
    for warning in result.warnings:
        log.warning(warning)
    folding = result.alignment.folding_percent(pre.fixed.body)
    unfold = {}
    if folding > 0 and config.unfold_passes:
        result.alignment, passes = result.alignment.unfolded(config.unfold_passes)
        unfold = {"folding_before": folding, "passes": passes}
        folding = result.alignment.folding_percent(pre.fixed.body)
    result.metrics["folding_percent"] = folding
    if "moving" in labels:
        result.warped_labels = result.warp(labels["moving"], labels=True)
    if "fixed" in labels and "moving" in labels:
        warped = result.warped_labels
        result.metrics.update(_dice_report(labels["fixed"], labels["moving"], warped))
    context.report("finish", 1, 1)
    stages["finish"] = {"seconds": seconds_since(clock), **({"unfold": unfold} if unfold else {})}
    return result


def resolved(config: RegistrationConfig, features: str) -> RegistrationConfig:
    """The configuration with the feature type in use (never "auto") and its defaults filled."""
    if config.features != features:
        config = config.with_overrides({"features": features})
    return config.resolved_for(features)


@dataclass
class PreAlignment:
    """A pair after the affine and coarse stages, and what they were computed from."""

    fixed: WorkingImage
    moving: WorkingImage
    fixed_maps: FeatureMaps
    moving_maps: FeatureMaps
    matches: Matches
    alignment: Alignment  # on fixed.grid: the affine and the coarse field (or zero)
    stages: dict[str, dict]
    coarse: tuple[torch.Tensor, Grid] | None = None  # the coarse field (mm) on its own grid
    warnings: list[str] = field(default_factory=list)  # a fallback path taken, for the user


def pre_align(
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    config: RegistrationConfig,
    extractor: FeatureExtractor,
    device: torch.device,
    context: StageContext | None = None,
    clock: float | None = None,
    pose: np.ndarray | None = None,
    pose_start: np.ndarray | None = None,
) -> PreAlignment:
    """Working grids, features, initial alignment, matching, and the affine and coarse stages.

    ``config`` must be resolved for the extractor's feature type (``resolved``) and the images
    checked with ``check_ct``; ``clock`` is when the preparation started, for its timing; ``pose``
    is a rigid fixed -> moving pose from HU (``initial_pose``) that checks the initial translation;
    ``pose_start`` is that pose however weak its fit, one start of the fallback paths.
    """
    context = context or StageContext(device=device)
    context.pose, context.pose_start = pose, pose_start
    warnings: list[str] = []
    report = context.report
    clock = time.perf_counter() if clock is None else clock
    stages: dict[str, dict] = {}
    report("prepare", 0, 2)
    context.fixed = to_working_grid(fixed_image, config.working_spacing_mm)
    report("prepare", 1, 2)
    context.moving = to_working_grid(moving_image, config.working_spacing_mm)
    report("prepare", 2, 2)
    grid = context.fixed.grid
    stages["prepare"] = {"seconds": seconds_since(clock), "working_grid": grid.to_dict()}

    clock = time.perf_counter()
    report("features", 0, 2)
    fixed_maps = extractor.extract(context.fixed)
    report("features", 1, 2)
    moving_maps = extractor.extract(context.moving)
    report("features", 2, 2)
    stages["features"] = {"seconds": seconds_since(clock), "extractor": extractor.name}

    clock = time.perf_counter()
    alignment = Alignment.identity(grid, device)
    alignment, info = initial.run(fixed_maps, moving_maps, alignment, config, context)
    stages["initial"] = {"seconds": seconds_since(clock), **info}

    try:
        alignment = _match_and_fit(fixed_maps, moving_maps, alignment, config, context, stages)
    except RegistrationFailed as refusal:
        if not config.affine.enabled:
            raise
        clock = time.perf_counter()
        alignment, info = fallback.run(fixed_maps, moving_maps, alignment, config, context, refusal)
        stages["fallback"] = {"seconds": seconds_since(clock), **info}
        stages["affine"] = {"status": "done", **info.pop("affine"), "fallback": info["path"]}
        warnings.append(
            f"The first alignment was refused ({str(refusal).split('. ')[0]}); the pair was "
            f"registered by a fallback: {info['path']}. Check the result visually."
        )
    matches = context.matches  # the affine's: the coarse stage may search fresh ones for itself
    alignment = run_stages(("coarse",), fixed_maps, moving_maps, alignment, config,
                           context, stages)  # fmt: skip
    return PreAlignment(
        context.fixed, context.moving, fixed_maps, moving_maps, matches, alignment, stages,
        context.coarse, warnings,
    )  # fmt: skip


def _match_and_fit(
    fixed_maps: FeatureMaps, moving_maps: FeatureMaps, alignment: Alignment,
    config: RegistrationConfig, context: StageContext, stages: dict[str, dict],
) -> Alignment:  # fmt: skip
    """The first path: matching around the initial alignment, the affine, and their checks."""
    clock = time.perf_counter()
    context.report("matching", 0, 1)
    context.matches = find_matches(
        fixed_maps, moving_maps, config.matching, alignment.affine,
        config.matching.search_radius_mm, context.device,
    )  # fmt: skip
    context.report("matching", 1, 1)
    stages["matching"] = {"seconds": seconds_since(clock), **context.matches.summary()}
    _check_shared_anatomy(context.matches, config.matching.min_match_share)
    alignment = run_stages(("affine",), fixed_maps, moving_maps, alignment, config,
                           context, stages)  # fmt: skip
    if not config.affine.enabled:
        stages["affine"] = skipped("disabled", "initial alignment kept")
    share = _check_overlap(context.fixed, context.moving, alignment.affine)
    stages["affine"]["overlap_share"] = round(share, 3)
    return alignment


def _check_shared_anatomy(matches, min_share: float) -> None:
    if matches.queried == 0:
        raise RegistrationFailed(
            "Under the initial alignment no part of the moving body lies on the fixed body, so "
            "no point could be matched. The scans probably show different anatomy, or, registered "
            "as placed, are placed apart. Check the inputs and their placement."
        )
    share = len(matches) / matches.queried
    if share < min_share:
        raise RegistrationFailed(
            f"Only {share:.0%} of the {matches.queried} points sampled in the moving image found a "
            f"reliable match in the fixed image (at least {min_share:.0%} is expected when both "
            "scans show the same body region). The scans probably show different anatomy or do "
            "not overlap. Check the inputs; if they do overlap, lower matching.min_match_share."
        )


def _check_overlap(fixed: WorkingImage, moving: WorkingImage, affine: np.ndarray) -> float:
    """The share of the smaller body on the other body; an alignment that leaves most of it off
    is refused."""
    share = fallback.overlap_share(fixed, moving, affine)
    if share < fallback.MIN_OVERLAP:
        raise RegistrationFailed(
            f"After the affine stage only {share:.0%} of the smaller body lies on the other body. "
            "The scans probably show different body regions or share too little anatomy. Check "
            "the inputs; if they do overlap, try the other feature type or a finer working grid."
        )
    return share


def _dice_report(fixed: sitk.Image, moving: sitk.Image, warped: sitk.Image) -> dict:
    reference = sitk.GetArrayFromImage(fixed)
    unregistered = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    labels = sorted(
        set(np.unique(reference)) & set(np.unique(sitk.GetArrayViewFromImage(moving))) - {0}
    )
    before = dice_per_label(reference, sitk.GetArrayFromImage(unregistered), labels)
    after = dice_per_label(reference, sitk.GetArrayFromImage(warped), labels)
    return {
        "dice_before": {str(k): v for k, v in before.items()},
        "dice_after": {str(k): v for k, v in after.items()},
        "mean_dice_before": mean_dice(before),
        "mean_dice_after": mean_dice(after),
    }
