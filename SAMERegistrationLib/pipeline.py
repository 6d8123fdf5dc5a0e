"""``register``: the SAME++ stages from two CT images to one RegistrationResult."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import spatial
from .config import RegistrationConfig
from .device import describe_device, memory_guard, resolve_device
from .errors import RegistrationFailed
from .evaluate import dice_per_label, mean_dice
from .features import FeatureExtractor, FeatureMaps, make_extractor
from .grid import Grid
from .image import ImageLike, WorkingImage, check_ct, check_labels, read_image, to_working_grid
from .matching import Matches, find_matches, with_model_threshold
from .result import RegistrationResult
from .stages import deform
from .stages.affine import fit_affine
from .stages.coarse import fit_coarse
from .stages.initial import centroid_translation, search_translation
from .stages.instance import optimise_instance
from .stages.robust_fit import affine_inliers

log = logging.getLogger(__name__)

# progress(stage, done, total): called as each stage advances; stage names are listed in STEPS.
ProgressCallback = Callable[[str, int, int], None]
STEPS = ("prepare", "features", "matching", "affine", "coarse", "deform", "instance", "finish")
MIN_OVERLAP = 0.2  # share of the fixed body that the moved moving body must cover


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
    report = progress or (lambda stage, done, total: None)
    stages: dict[str, dict] = {}

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
    config = config.resolved_for(extractor.name)
    network, deform_source = None, "disabled"
    if config.deform.enabled:
        network, deform_source = deform.choose_model(
            config.deform,
            extractor.name,
            getattr(extractor, "weights", None),
            config.working_spacing_mm,
            device,
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)

    with memory_guard(device, config.working_spacing_mm):
        pre = pre_align(fixed_image, moving_image, config, extractor, device, report, clock)
        stages.update(pre.stages)
        dense, grid = pre.dense, pre.fixed.grid

        clock = time.perf_counter()
        report("deform", 0, 1)
        if network is None:
            if config.deform.enabled:
                log.info("deform stage skipped: %s", deform_source)
            stages["deform"] = _skipped(deform_source)
        else:
            dense, info = deform.apply_deform(
                network, pre.fixed, pre.moving, pre.fixed_maps, pre.moving_maps, pre.affine, dense
            )
            stages["deform"] = {
                "status": "done",
                "seconds": _lap(clock),
                "weights": deform_source,
                **info,
            }
        report("deform", 1, 1)

        clock = time.perf_counter()
        if config.instance.enabled:
            dense, info = optimise_instance(
                pre.fixed_maps, pre.moving_maps, pre.affine, dense, grid, config.instance,
                lambda i, n, loss: report("instance", i, n),
            )  # fmt: skip
            stages["instance"] = {"status": "done", "seconds": _lap(clock), **info}
        else:
            stages["instance"] = _skipped("disabled")

    clock = time.perf_counter()
    result = RegistrationResult(
        fixed_grid=Grid.from_sitk(fixed_image),
        working_grid=grid,
        affine=pre.affine,
        dense=dense[0].cpu().numpy().astype(np.float32),
        matches=pre.matches,
        config=config,
        features=extractor.name,
        device=describe_device(device),
        stages=stages,
        fixed_features=pre.fixed_maps,
        moving_features=pre.moving_maps,
    )
    result.metrics["folding_percent"] = _folding(result, pre.fixed)
    if "fixed" in labels and "moving" in labels:
        result.metrics.update(_dice_report(result, labels["fixed"], labels["moving"]))
    if "moving" in labels:
        result.warped_labels = result.warp(labels["moving"], labels=True)
    report("finish", 1, 1)
    stages["finish"] = {"seconds": _lap(clock)}
    return result


@dataclass
class PreAlignment:
    """A pair after the affine and coarse stages: the map ``p -> A(p + dense(p))`` and its inputs."""

    fixed: WorkingImage
    moving: WorkingImage
    fixed_maps: FeatureMaps
    moving_maps: FeatureMaps
    matches: Matches
    affine: np.ndarray  # 4x4 fixed -> moving, LPS mm
    dense: torch.Tensor  # (1, 3, D, H, W) mm on fixed.grid: the coarse stage's field, or zero
    stages: dict[str, dict]
    coarse: torch.Tensor | None = None  # the coarse stage's own field (mm) on coarse_grid
    coarse_grid: Grid | None = None


def pre_align(
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    config: RegistrationConfig,
    extractor: FeatureExtractor,
    device: torch.device,
    report: ProgressCallback | None = None,
    clock: float | None = None,
) -> PreAlignment:
    """Working grids, features, initial alignment, matching, and the affine and coarse stages.

    ``config`` must be resolved for the extractor's feature type (``resolved_for``) and the images
    checked with ``check_ct``; ``clock`` is when the preparation started, for its timing.
    """
    report = report or (lambda stage, done, total: None)
    clock = time.perf_counter() if clock is None else clock
    stages: dict[str, dict] = {}
    report("prepare", 0, 2)
    fixed_work = to_working_grid(fixed_image, config.working_spacing_mm)
    report("prepare", 1, 2)
    moving_work = to_working_grid(moving_image, config.working_spacing_mm)
    report("prepare", 2, 2)
    stages["prepare"] = {"seconds": _lap(clock), "working_grid": fixed_work.grid.to_dict()}

    clock = time.perf_counter()
    report("features", 0, 2)
    fixed_maps = extractor.extract(fixed_work)
    report("features", 1, 2)
    moving_maps = extractor.extract(moving_work)
    report("features", 2, 2)
    stages["features"] = {"seconds": _lap(clock), "extractor": extractor.name}

    clock = time.perf_counter()
    prior, info = _initial_alignment(fixed_maps, moving_maps, config.initialisation)
    stages["initial"] = {"seconds": _lap(clock), "method": config.initialisation, **info}

    clock = time.perf_counter()
    report("matching", 0, 1)
    matches = find_matches(
        fixed_maps, moving_maps, config.matching, prior, config.matching.search_radius_mm, device
    )
    report("matching", 1, 1)
    stages["matching"] = {"seconds": _lap(clock), **matches.summary()}
    _check_shared_anatomy(matches, config.matching.min_match_share)

    affine = prior
    clock = time.perf_counter()
    if config.affine.enabled:
        radii = config.affine.refine_radii_mm
        affine, info = fit_affine(matches, config.affine, config.seed)
        for i, radius in enumerate(radii):
            report("affine", i + 1, len(radii) + 1)
            matches = find_matches(fixed_maps, moving_maps, config.matching, affine, radius, device)
            affine, info = fit_affine(matches, config.affine, config.seed)
        matches = affine_inliers(matches, affine, config.affine)  # what the affine was fitted to
        report("affine", len(radii) + 1, len(radii) + 1)
        stages["affine"] = {"status": "done", "seconds": _lap(clock), **info}
    else:
        stages["affine"] = _skipped("disabled", "initial alignment kept")
    _check_overlap(fixed_work, moving_work, affine)

    grid = fixed_work.grid
    dense = torch.zeros((1, 3, *grid.shape), device=device)
    coarse, coarse_grid = None, None
    coarse_matches = matches
    clock = time.perf_counter()
    if config.coarse.enabled:
        if config.coarse.rematch_radius_mm:
            coarse_matches = find_matches(
                fixed_maps, moving_maps, config.matching, affine,
                config.coarse.rematch_radius_mm, device,
            )  # fmt: skip
        if len(coarse_matches) >= 4:
            coarse, coarse_grid, info = fit_coarse(
                coarse_matches, affine, grid, config.coarse, device,
                lambda i, n, loss: report("coarse", i, n),
            )  # fmt: skip
            dense = spatial.resample_field(coarse, coarse_grid, grid)
            stages["coarse"] = {"status": "done", "seconds": _lap(clock), **info}
        else:
            stages["coarse"] = _skipped("too few matches", f"{len(coarse_matches)} matches")
    else:
        stages["coarse"] = _skipped("disabled")
    return PreAlignment(
        fixed_work, moving_work, fixed_maps, moving_maps, matches, affine, dense, stages,
        coarse, coarse_grid,
    )  # fmt: skip


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _skipped(reason: str, detail: str | None = None) -> dict:
    info = {"status": "skipped", "reason": reason}
    if detail:
        info["detail"] = detail
    return info


def _initial_alignment(
    fixed: FeatureMaps, moving: FeatureMaps, mode: str
) -> tuple[np.ndarray, dict]:
    if mode == "search":
        return search_translation(fixed, moving)
    if mode == "centroid":
        matrix = centroid_translation(fixed, moving)
        return matrix, {"translation_mm": matrix[:3, 3].round(2).tolist()}
    return np.eye(4), {}


def _check_shared_anatomy(matches, min_share: float) -> None:
    share = len(matches) / max(matches.queried, 1)
    if share < min_share:
        raise RegistrationFailed(
            f"Only {share:.0%} of the {matches.queried} points sampled in the moving image found a "
            f"reliable match in the fixed image (at least {min_share:.0%} is expected when both "
            "scans show the same body region). The scans probably show different anatomy or do "
            "not overlap. Check the inputs; if they do overlap, lower matching.min_match_share."
        )


def _check_overlap(fixed: WorkingImage, moving: WorkingImage, affine: np.ndarray) -> None:
    """Refuse an alignment that leaves most of the fixed body outside the moving body."""
    step = 2
    zyx = np.argwhere(fixed.body[::step, ::step, ::step]) * step
    points = fixed.grid.index_to_physical(zyx[:, ::-1].astype(np.float64))
    mapped = points @ affine[:3, :3].T + affine[:3, 3]
    idx = np.rint(moving.grid.physical_to_index(mapped)).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(moving.grid.size_xyz)), axis=1)
    covered = np.zeros(len(idx), dtype=bool)
    covered[inside] = moving.body[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    share = float(covered.mean()) if len(covered) else 0.0
    if share < MIN_OVERLAP:
        raise RegistrationFailed(
            f"After the affine stage only {share:.0%} of the fixed body lies on the moving body. "
            "The scans probably show different body regions or share too little anatomy. Check "
            "the inputs; if they do overlap, try the other feature type or a finer working grid."
        )


def _folding(result: RegistrationResult, fixed: WorkingImage) -> float:
    """% of fixed body voxels where the total map folds; the affine's sign enters as det(A)."""
    dense = torch.as_tensor(result.dense)[None]
    det = spatial.jacobian_determinant(dense, result.working_grid).numpy()
    det = det * np.linalg.det(result.affine[:3, :3])
    inside = det[fixed.body]
    return float((inside <= 0).mean() * 100.0) if inside.size else 0.0


def _dice_report(result: RegistrationResult, fixed: sitk.Image, moving: sitk.Image) -> dict:
    reference = sitk.GetArrayFromImage(fixed)
    unregistered = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    warped = result.warp(moving, labels=True)
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
