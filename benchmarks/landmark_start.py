"""What the pipeline reaches on a pair when it starts from a rigid pose fitted to organ landmarks.

    python benchmarks/landmark_start.py                      # the four pairs that move 221
    python benchmarks/landmark_start.py 239:207 201:232 --threads 1

Separates a wrong start from later stages that cannot fix a good one. For each OpenKBP validation
pair (FIXED:MOVING patient numbers) a rigid fixed -> moving pose is fitted by least squares to
landmarks both label maps share: the parotids' centroids and three points of the spinal cord, at
0, 40 and 70 mm below the brainstem (scans without a brainstem give no cord points). The moving
scan and its labels are pre-aligned by that pose (their geometry changed, no resampling), as a
user who placed the scans by hand would pass them, and registered with
``initialisation=identity``, the pose search and the match-share check off. Columns: how far
(mean mm over the landmarks) the landmark pose, the pipeline's own pose search and its whole map
leave the landmarks; mean Dice of the pipeline from its own start (default settings), of the
landmark pose alone, of the pipeline from it, and of the pipeline from it without the affine
stage; the pose search's score (NCC of HU) at its own pose and at the landmark pose; the final
local NCC of the images (the instance stage's measure) from the pipeline's own start and from the
landmark pose: whether the images themselves prefer the landmark start. Prints a table and writes
it to ``benchmarks/results/landmark_start-<time>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _common import (
    RESULTS,
    case_files,
    find_openkbp,
    markdown_table,
    parse_overrides,
    register_case,
    save_table_run,
)

if TYPE_CHECKING:
    import SimpleITK as sitk

    from SAMERegistrationLib import RegistrationResult

DEFAULT_PAIRS = ("236:221", "202:221", "206:221", "213:221")
PAROTIDS = (3, 4)
CORD, BRAINSTEM = 2, 1
CORD_POINTS_MM = (0.0, 40.0, 70.0)  # below the brainstem's lowest slice
ROWS = ("own start", "landmark pose alone", "from landmark pose", "from landmark pose, no affine")


def landmarks(labels: sitk.Image) -> dict[str, np.ndarray]:
    """Named landmark points (LPS mm) of an OpenKBP label map (a SimpleITK image)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(labels)

    def physical(zyx: np.ndarray) -> np.ndarray:
        return np.array(labels.TransformContinuousIndexToPhysicalPoint(zyx[::-1].tolist()))

    found = {}
    for label in PAROTIDS:
        voxels = np.argwhere(array == label)
        if len(voxels):
            found[f"parotid {label}"] = physical(voxels.mean(axis=0))
    stem = np.flatnonzero((array == BRAINSTEM).any(axis=(1, 2)))
    if len(stem):
        # OpenKBP scans are axis-aligned with slices numbered upwards: below is a lower index.
        for depth in CORD_POINTS_MM:
            z = stem.min() - 1 - int(round(depth / labels.GetSpacing()[2]))
            cord = np.argwhere(array[z] == CORD) if z >= 0 else []
            if len(cord):
                found[f"cord {depth:.0f} mm down"] = physical(np.array([z, *cord.mean(axis=0)]))
    return found


def rigid_fit(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """The 4x4 rigid map taking points ``fixed`` (N, 3) closest to ``moving`` (least squares)."""
    fixed_mean, moving_mean = fixed.mean(axis=0), moving.mean(axis=0)
    u, _, vt = np.linalg.svd((fixed - fixed_mean).T @ (moving - moving_mean))
    sign = np.sign(np.linalg.det(vt.T @ u.T))
    rotation = vt.T @ np.diag([1.0, 1.0, sign]) @ u.T
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, moving_mean - rotation @ fixed_mean
    return matrix


def shared_landmarks(
    fixed_labels: sitk.Image, moving_labels: sitk.Image
) -> tuple[np.ndarray, np.ndarray]:
    """The landmarks both label maps hold, as two (N, 3) arrays of matching rows (LPS mm)."""
    fixed, moving = landmarks(fixed_labels), landmarks(moving_labels)
    names = sorted(set(fixed) & set(moving))
    if len(names) < 3:
        raise ValueError(f"only {len(names)} landmarks in both label maps (3 needed)")
    return np.array([fixed[n] for n in names]), np.array([moving[n] for n in names])


def landmark_error(fixed: np.ndarray, moving: np.ndarray, mapped: np.ndarray) -> float:
    """Mean distance (mm) from where a map sends the fixed landmarks to the moving ones."""
    return float(np.linalg.norm(mapped - moving, axis=1).mean())


def landmark_pose(
    fixed_labels: sitk.Image, moving_labels: sitk.Image
) -> tuple[np.ndarray, float, int]:
    """The rigid fixed -> moving pose of the shared landmarks, their mean residual (mm) and count."""
    from SAMERegistrationLib.initial_pose import apply

    f, m = shared_landmarks(fixed_labels, moving_labels)
    pose = rigid_fit(f, m)
    return pose, landmark_error(f, m, apply(pose, f)), len(f)


def registered(case: dict, overrides: dict) -> RegistrationResult | str:
    """The pipeline's result (MIND features) on ``case``, or the refusal's first sentence."""
    from SAMERegistrationLib.errors import RegistrationFailed

    try:
        return register_case(case, features="mind", **overrides)
    except RegistrationFailed as refusal:
        return "refused: " + str(refusal).split(". ")[0]


def hu_similarity(case: dict, pose: np.ndarray, spacing_mm: float) -> float:
    """The initial pose search's score (masked NCC of HU over the bodies' overlap) at ``pose``."""
    import SimpleITK as sitk

    from SAMERegistrationLib.initial_pose import coarse_ct, masked_ncc_at

    fixed, moving = (coarse_ct(sitk.ReadImage(case[k]), spacing_mm) for k in ("fixed", "moving"))
    return masked_ncc_at(fixed, moving, pose)


def score_pair(case: dict, overrides: dict) -> dict:
    import SimpleITK as sitk

    from SAMERegistrationLib.config import InitialPoseConfig
    from SAMERegistrationLib.evaluate import dice_per_label, mean_dice
    from SAMERegistrationLib.initial_pose import apply, reorient

    fixed_labels = sitk.ReadImage(case["fixed_labels"])
    moving_labels = sitk.ReadImage(case["moving_labels"])
    pose, residual, count = landmark_pose(fixed_labels, moving_labels)
    placed = {
        **case,
        "moving": reorient(sitk.ReadImage(case["moving"]), pose),
        "moving_labels": reorient(moving_labels, pose),
    }
    reference = sitk.GetArrayFromImage(fixed_labels)
    labels = sorted(
        set(reference.ravel()) & set(sitk.GetArrayViewFromImage(moving_labels).ravel()) - {0}
    )
    start = sitk.Resample(placed["moving_labels"], fixed_labels, sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0)  # fmt: skip
    # The match-share check judges a start; this one is known, so it stays off.
    from_pose = {
        "initialisation": "identity", "initial_pose__enabled": False,
        "matching__min_match_share": 0.0,
    }  # fmt: skip
    own = registered(case, overrides)
    runs = {
        ROWS[0]: own,
        ROWS[1]: mean_dice(dice_per_label(reference, sitk.GetArrayFromImage(start), labels)),
        ROWS[2]: registered(placed, {**from_pose, **overrides}),
        ROWS[3]: registered(placed, {**from_pose, "affine__enabled": False, **overrides}),
    }
    dice = {
        k: v.metrics["mean_dice_after"] if hasattr(v, "metrics") else v for k, v in runs.items()
    }
    hu = {"landmark pose": hu_similarity(case, pose, InitialPoseConfig().spacing_mm)}
    errors = {"landmark pose": residual}
    if hasattr(own, "stages"):
        hu["own pose"] = own.stages["initial_pose"]["similarity"]
        # How far the pipeline's own pose, affine and whole map leave the organs' landmarks.
        f, m = shared_landmarks(fixed_labels, moving_labels)
        own_pose = np.array(own.stages["initial_pose"]["pose_matrix"])
        errors["own pose"] = landmark_error(f, m, apply(own_pose, f))
        errors["own affine"] = landmark_error(f, m, apply(own.affine, f))
        errors["own result"] = landmark_error(f, m, own.map_points(f))
    # Whether the images themselves prefer the landmark start: the local NCC they reach.
    final = {
        k: v.stages["instance"].get("similarity_after")
        for k, v in runs.items()
        if hasattr(v, "stages")
    }
    return {
        "landmarks": count, "residual_mm": residual, "pose": pose.tolist(), "dice": dice,
        "hu_similarity": hu, "final_local_ncc": final, "landmark_error_mm": errors,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="*", default=list(DEFAULT_PAIRS), help="FIXED:MOVING")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a configuration override for every run (repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--data", type=Path, help="shared data folder or its openkbp/")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="benchmarks/results/")
    args = parser.parse_args(argv)
    overrides = {
        k.replace(".", "__"): v for k, v in parse_overrides(args.set, parser.error).items()
    }
    pairs = []
    for text in args.pairs:
        fixed, sep, moving = text.partition(":")
        if not (sep and fixed.isdigit() and moving.isdigit()):
            parser.error(f"a pair is FIXED:MOVING patient numbers, e.g. 236:221, not '{text}'")
        pairs.append((f"validation_pt_{fixed}", f"validation_pt_{moving}"))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    openkbp = find_openkbp(args.data)
    results, table = [], []
    for fixed, moving in pairs:
        try:
            found = score_pair(case_files(openkbp, fixed, moving), overrides)
        except ValueError as err:  # too few landmarks: the other pairs still count
            print(f"{fixed} <- {moving}: skipped, {err}")
            results.append({"fixed": fixed, "moving": moving, "skipped": str(err)})
            continue
        results.append({"fixed": fixed, "moving": moving, **found})
        dice = [d if isinstance(d, str) else f"{d:.3f}" for d in found["dice"].values()]
        hu = [
            f"{found['hu_similarity'].get(k, float('nan')):.2f}"
            for k in ("own pose", "landmark pose")
        ]
        final = [f"{found['final_local_ncc'].get(k, float('nan')):.2f}" for k in (ROWS[0], ROWS[2])]
        pair = f"{fixed[-3:]} <- {moving[-3:]}"
        errors = " / ".join(
            f"{found['landmark_error_mm'].get(k, float('nan')):.0f}"
            for k in ("landmark pose", "own pose", "own result")
        )
        table.append([pair, errors, *dice, *hu, *final])
        print(f"{fixed} <- {moving}: " + ", ".join(f"{r} {d}" for r, d in zip(ROWS, dice)))
    head = [
        "pair", "landmark error mm: landmark pose / own pose / own result", *ROWS,
        "HU NCC own pose", "HU NCC landmark pose",
        "final local NCC own start", "final local NCC from landmark pose",
    ]  # fmt: skip
    text = markdown_table(head, table)
    print(f"\nMean Dice (MIND features)\n\n{text}")
    save_table_run(args.output_dir, "landmark_start", {
        "overrides": overrides, "data": str(openkbp), "pairs": results, "table_markdown": text,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
