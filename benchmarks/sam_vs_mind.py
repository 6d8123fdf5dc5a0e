"""Compare SAM embeddings with MIND-SSC features on OpenKBP validation patients.

    python benchmarks/sam_vs_mind.py                          # the shipped SAM model
    python benchmarks/sam_vs_mind.py --sam-weights SAM.pth    # another SAM checkpoint
    python benchmarks/sam_vs_mind.py --cases 1 --pairs 1      # a quick look
    python benchmarks/sam_vs_mind.py --sam-weights my.pth --skip-mind  # that model alone
    python benchmarks/sam_vs_mind.py --figure sam.png         # also draw the three measures
    python benchmarks/sam_vs_mind.py --replot RESULTS.json --figure sam.png  # tables, figure again

Three measures, each for SAM and for MIND, with the matching each gets in the pipeline today
(``config.FEATURE_DEFAULTS``: for SAM a global search with a ratio test, the region both scans
cover and the model's calibrated similarity threshold from its record, ``matching.
with_model_threshold``; for MIND a 20 mm window around the initial alignment; MIND over the whole
image is listed too, to show why it needs the window), so the figures describe what users get:

1. Matching error under known deformations. Each validation CT is warped by a known smooth random
   deformation; for the pipeline's grid points in the warped scan, the error (mm) of the
   nearest-embedding match in the original, before and after cycle-consistent stable sampling
   (SSCC, with the feature's threshold), and the share of grid points SSCC keeps.
2. Organ landmarks. On seeded pairs of validation patients, for each organ present in both
   scans: does the match of the moving organ's centroid fall inside the same organ of the fixed
   scan?
3. Inter-patient Dice after the affine and the affine + coarse stages, on the same pairs, with the
   share of grid points whose match the affine used and, of those matches that start in an organ,
   the share that end in the same organ of the fixed scan (the matches' accuracy across patients),
   the pairs registered (the pipeline refuses a pair with too few reliable matches) and the
   seconds per pair (features, matching, affine and coarse; one process, CPU).

A SAM model trained on any of the validation patients is refused before any work, when its record
(``NAME.json`` beside the weights, key ``training_scans`` as a list) or its training folder
(``train_config.json`` beside the weights: its scans and its pair-map cache's scans) says so.

Results are printed as markdown tables and saved to ``benchmarks/results/sam_vs_mind-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from _common import (
    RESULTS,
    case_files,
    draw_pairs,
    find_openkbp,
    fmt,
    machine_info,
    markdown_table,
    mean_sd_text,
    mean_text,
    median_or_none,
    parse_overrides,
    register_case,
    validation_patients,
    write_json,
)
from run_pairs import affine_metrics

from SAMERegistrationLib.config import FEATURE_DEFAULTS, MatchingConfig, RegistrationConfig
from SAMERegistrationLib.errors import InputError, RegistrationFailed
from SAMERegistrationLib.features.mind import MindExtractor
from SAMERegistrationLib.features.sam import SamExtractor, default_weights
from SAMERegistrationLib.grid import Grid
from SAMERegistrationLib.image import read_image, to_working_grid
from SAMERegistrationLib.matching import (
    find_matches,
    grid_queries,
    nearest_matches,
    with_model_threshold,
)
from SAMERegistrationLib.shipped import read_record
from SAMERegistrationLib.stages.initial import search_translation
from SAMERegistrationLib.synthetic import known_pair, smooth_displacement
from SAMERegistrationLib.train.pair_maps import cache_scans

# The searches compared: (row name, feature type, search radius in mm; 0 = whole image).
SEARCHES = (
    ("SAM", "sam", FEATURE_DEFAULTS["sam"]["matching.search_radius_mm"]),
    ("MIND (20 mm window)", "mind", FEATURE_DEFAULTS["mind"]["matching.search_radius_mm"]),
    ("MIND (whole image)", "mind", 0.0),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sam-weights", type=Path, help="SAM checkpoint (default: the shipped one)"
    )
    parser.add_argument(
        "--sam-threshold",
        type=float,
        help="SSCC similarity threshold for SAM (default: the model record's, else SAME's 0.7)",
    )
    parser.add_argument("--skip-mind", action="store_true", help="evaluate SAM only")
    parser.add_argument(
        "--sam-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the SAM runs, as same-register's --set (repeatable)",
    )
    parser.add_argument("--cases", type=int, default=4, help="warped validation CTs (4)")
    parser.add_argument("--pairs", type=int, default=10, help="inter-patient pairs (10)")
    parser.add_argument("--warp-mm", type=float, default=12.0, help="largest warp vector (12 mm)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the warps and pairing (0)")
    parser.add_argument("--data", type=Path, help="shared data folder or its openkbp folder")
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results/)")
    parser.add_argument("--figure", type=Path, help="also plot the three measures to this PNG")
    parser.add_argument(
        "--replot", type=Path, metavar="RESULTS.json", help="print and plot saved results, no run"
    )
    args = parser.parse_args(argv)
    if args.replot is not None:
        return args
    args.sam_overrides = parse_overrides(args.sam_set, parser.error)
    args.sam_weights = args.sam_weights or default_weights()
    if args.sam_weights is None:
        parser.error("no SAM weights ship with this installation: pass --sam-weights")
    return args


def features_of(document: dict) -> tuple[str, ...]:
    """The feature types a run evaluated (older results always hold both)."""
    return ("sam",) if document["settings"].get("skip_mind") == "True" else ("sam", "mind")


def sam_config(weights: Path, threshold: float | None) -> RegistrationConfig:
    """The pipeline's configuration for this SAM model: ``threshold`` when given, else the
    model's calibrated one from its record, else the feature default."""
    config = RegistrationConfig(features="sam")
    if threshold is not None:
        config = config.with_overrides({"matching.similarity_threshold": threshold})
    return with_model_threshold(config, weights).resolved_for("sam")


def training_scans(weights: Path) -> dict[str, list[str]]:
    """What says which scans trained ``weights``: the record's ``training_scans`` list, the
    training folder's ``train_config.json`` (its scans and its pair-map cache's scans)."""
    sources = {}
    record_file = weights.with_suffix(".json")
    listed = read_record(record_file).get("training_scans")
    if isinstance(listed, list):
        sources[str(record_file)] = [str(s) for s in listed]
    config_file = weights.parent / "train_config.json"
    if config_file.is_file():
        run = json.loads(config_file.read_text())
        sources[str(config_file)] = [str(s) for s in run.get("scans", [])]
        cache = (run.get("config") or {}).get("pair_maps")
        if cache:
            sources[f"{cache} (pair-map cache)"] = cache_scans(cache)
    return sources


def refuse_training_overlap(weights: Path, patients: list[str]) -> None:
    """Stop when the model was trained on any of the evaluation ``patients`` (scan file names
    ``<patient>_ct.nii.gz``): its figures would not describe held-out scans."""
    for source, scans in training_scans(weights).items():
        names = {Path(scan).name for scan in scans}
        overlap = sorted(p for p in patients if f"{p}_ct.nii.gz" in names)
        if overlap:
            raise InputError(
                f"{weights} was trained on {len(overlap)} evaluation patient(s) ({overlap[0]}, "
                f"per {source}); evaluate a model trained without validation patients."
            )


def prior_from(translation_mm: list[float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = translation_mm
    return matrix


# --- 1. matching error under known deformations ------------------------------------------------


def warp_case(ct: sitk.Image, magnitude_mm: float, seed: int):
    """The CT as moving image and a copy warped by a known smooth map as fixed image."""
    moving = sitk.Cast(ct, sitk.sitkFloat32)
    phi = smooth_displacement(Grid.from_sitk(moving), magnitude_mm, seed=seed)
    return known_pair(moving, phi)


def matching_errors(pair, extractors: dict, configs: dict[str, MatchingConfig]) -> dict:
    """Per search: errors (mm) of one-way matches and of SSCC-kept matches, and the share kept.
    ``configs`` holds each feature type's matching settings as the pipeline resolves them."""
    fixed_work = to_working_grid(pair.fixed, 2.0)
    moving_work = to_working_grid(pair.moving, 2.0)
    maps = {
        name: (extractor.extract(fixed_work), extractor.extract(moving_work))
        for name, extractor in extractors.items()
    }
    rows = {}
    for row, feature, radius in searches(tuple(extractors)):
        fixed_maps, moving_maps = maps[feature]
        prior, _ = search_translation(fixed_maps, moving_maps)
        queries = grid_queries(moving_maps, configs[feature].grid_stride)
        raw = nearest_matches(fixed_maps, moving_maps, queries, prior, radius)
        stable = find_matches(fixed_maps, moving_maps, configs[feature], prior, radius)
        rows[row] = {
            "one_way_mm": _errors(pair, raw),
            "sscc_mm": _errors(pair, stable),
            "grid_points": stable.queried,
            "kept": len(stable),
        }
    return rows


def searches(features: tuple[str, ...]) -> list[tuple[str, str, float]]:
    return [search for search in SEARCHES if search[1] in features]


def _errors(pair, matches) -> list[float]:
    """How far the true map sends each matched fixed point from its moving point (mm)."""
    if len(matches) == 0:
        return []
    truth = pair.true_map(matches.fixed)
    return np.linalg.norm(truth - matches.moving, axis=1).round(3).tolist()


# --- 2 and 3. inter-patient pairs ------------------------------------------------------------


def organ_landmarks(result, fixed_labels: sitk.Image, moving_labels: sitk.Image) -> dict:
    """For each organ in both scans: is the match of the moving centroid inside the fixed organ?"""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(moving_labels)
    fixed_present = set(np.unique(sitk.GetArrayViewFromImage(fixed_labels))) - {0}
    organs = [label for label in stats.GetLabels() if label in fixed_present]
    if not organs:
        return {}
    fixed_maps, moving_maps = result.fixed_features, result.moving_features
    centroids = np.array([stats.GetCentroid(label) for label in organs])
    zyx = np.round(moving_maps.grid.physical_to_index(centroids)).astype(int)[:, ::-1]
    config = result.config
    prior = prior_from(result.stages["initial"]["translation_mm"])
    hits = {}
    for label, voxel in zip(organs, zyx):
        found = nearest_matches(
            fixed_maps, moving_maps, voxel[None], prior, config.matching.search_radius_mm
        )
        if len(found) == 0:  # the centroid lies outside the moving body mask
            hits[str(label)] = False
            continue
        index = fixed_labels.TransformPhysicalPointToContinuousIndex(found.fixed[0].tolist())
        index = [int(round(i)) for i in index]
        inside = all(0 <= i < n for i, n in zip(index, fixed_labels.GetSize()))
        hits[str(label)] = bool(inside and fixed_labels[index] == label)
    return hits


def _labels_at(labels: sitk.Image, points: np.ndarray) -> np.ndarray:
    """The label under each LPS point (nearest voxel; 0 outside the image)."""
    grid = Grid.from_sitk(labels)
    index = np.round(grid.physical_to_index(points)).astype(int)  # (x, y, z)
    inside = np.all((index >= 0) & (index < np.array(labels.GetSize())), axis=1)
    array = sitk.GetArrayViewFromImage(labels)
    found = np.zeros(len(points), dtype=np.int64)
    found[inside] = array[index[inside, 2], index[inside, 1], index[inside, 0]]
    return found


def match_organ_agreement(result, fixed_labels: sitk.Image, moving_labels: sitk.Image) -> dict:
    """Of the matches the affine was fitted to whose moving point lies in an organ present in
    both scans, how many have their fixed point in the same organ: the embeddings' accuracy
    across patients, apart from the affine fit."""
    matches = result.matches
    if len(matches) == 0:
        return {"in_organ": 0, "same_organ": 0}
    moving = _labels_at(moving_labels, matches.moving)
    fixed = _labels_at(fixed_labels, matches.fixed)
    shared = set(np.unique(sitk.GetArrayViewFromImage(fixed_labels)).tolist()) - {0}
    in_organ = np.isin(moving, sorted(shared))
    return {
        "in_organ": int(in_organ.sum()),
        "same_organ": int((in_organ & (fixed == moving)).sum()),
    }


def run_pair(
    openkbp: Path, fixed: str, moving: str, feature: str, args: argparse.Namespace
) -> dict:
    case = case_files(openkbp, fixed, moving)
    settings = {"instance__enabled": False, "deform__enabled": False}
    if feature == "sam":
        settings["sam_weights"] = str(args.sam_weights)
        if args.sam_threshold is not None:
            settings["matching__similarity_threshold"] = args.sam_threshold
        settings.update({key.replace(".", "__"): v for key, v in args.sam_overrides.items()})
    clock = time.perf_counter()
    try:
        result = register_case(case, features=feature, **settings)
    except RegistrationFailed as err:
        return {"status": "refused", "reason": str(err)}
    seconds = time.perf_counter() - clock
    affine = affine_metrics(result, case["fixed_labels"], case["moving_labels"])
    fixed_labels = sitk.ReadImage(case["fixed_labels"])
    moving_labels = sitk.ReadImage(case["moving_labels"])
    landmarks = organ_landmarks(result, fixed_labels, moving_labels)
    return {
        "status": "done",
        "seconds": round(seconds, 1),
        "dice_unregistered": result.metrics.get("mean_dice_before"),
        "dice_affine": affine["mean_dice_after"],
        "dice_coarse": result.metrics.get("mean_dice_after"),
        "landmark_hits": landmarks,
        "matches_kept": len(result.matches),
        "grid_points": result.matches.queried,
        "match_organs": match_organ_agreement(result, fixed_labels, moving_labels),
    }


# --- report ----------------------------------------------------------------------------------


def matching_table(cases: list[dict], features: tuple[str, ...]) -> str:
    head = ["features (search)", "one-way median mm", "one-way < 4 mm", "SSCC median mm"]
    head += ["SSCC < 4 mm", "SSCC share kept"]
    rows = []
    for row, _, _ in searches(features):
        raw = [e for case in cases for e in case[row]["one_way_mm"]]
        kept = [e for case in cases for e in case[row]["sscc_mm"]]
        queried = sum(case[row]["grid_points"] for case in cases)
        share = sum(case[row]["kept"] for case in cases) / max(queried, 1)
        cells = [row, fmt(median_or_none(raw), 2), _share(raw), fmt(median_or_none(kept), 2)]
        rows.append([*cells, _share(kept), f"{100 * share:.1f} %"])
    return markdown_table(head, rows)


def _share(errors: list[float], limit: float = 4.0) -> str:
    return f"{100 * np.mean(np.array(errors) < limit):.1f} %" if errors else "n/a"


def pairs_table(pairs: list[dict], features: tuple[str, ...]) -> str:
    head = ["features", "pairs registered", "Dice affine", "Dice +coarse"]
    head += ["organ landmarks inside", "affine matches kept"]
    head += ["of those in an organ: same organ", "seconds per pair"]
    rows = []
    for feature in features:
        runs = [p[feature] for p in pairs]
        done = [r for r in runs if r["status"] == "done"]
        hits = [h for r in done for h in r["landmark_hits"].values()]
        inside = 100 * np.mean(hits) if hits else float("nan")
        rows.append(
            [
                feature.upper(),
                f"{len(done)}/{len(runs)}",
                mean_sd_text(r["dice_affine"] for r in done),
                mean_sd_text(r["dice_coarse"] for r in done),
                f"{inside:.1f} % ({sum(hits)}/{len(hits)})",
                _kept(done),
                _same_organ(done),
                mean_text((r["seconds"] for r in done), 2),
            ]
        )
    return markdown_table(head, rows)


def _kept(done: list[dict]) -> str:
    """Share of grid points whose match the affine used (older results lack the grid count)."""
    runs = [r for r in done if r.get("grid_points")]
    if not runs:
        return "n/a"
    kept = sum(r["matches_kept"] for r in runs)
    return f"{100 * kept / sum(r['grid_points'] for r in runs):.1f} %"


def _same_organ(done: list[dict]) -> str:
    counts = [r["match_organs"] for r in done if "match_organs" in r]
    in_organ = sum(c["in_organ"] for c in counts)
    if not in_organ:
        return "n/a"
    same = sum(c["same_organ"] for c in counts)
    return f"{100 * same / in_organ:.1f} % ({same}/{in_organ})"


def plot(document: dict, path: Path) -> None:
    """Three panels: matching-error curves, inter-patient Dice per pair, organ landmarks inside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (errors, dice, organs) = plt.subplots(1, 3, figsize=(14, 4.2))
    limits = np.linspace(0.0, 20.0, 201)
    colours = {"SAM": "#c44e52", "MIND (20 mm window)": "#4c72b0", "MIND (whole image)": "#8c8c8c"}
    features = features_of(document)
    for row, _, _ in searches(features):
        for key, style, label in (("sscc_mm", "-", "SSCC"), ("one_way_mm", ":", "one-way")):
            values = np.array([e for case in document["cases"] for e in case[row][key]])
            if len(values):
                share = (values[None] <= limits[:, None]).mean(axis=1)
                errors.plot(limits, share, style, color=colours[row], label=f"{row}, {label}")
    errors.set_xlabel("matching error (mm)")
    errors.set_ylabel("share of matches with at most this error")
    errors.set_title(f"Known warps, {len(document['cases'])} validation CT(s)")
    errors.legend(fontsize=7, loc="lower right")
    errors.set_ylim(0, 1)

    labels = [f"{p['fixed'][-3:]}←{p['moving'][-3:]}".replace("_", "") for p in document["pairs"]]
    positions = np.arange(len(labels))
    bars = ((-0.2, "sam", "#c44e52"), (0.2, "mind", "#4c72b0"))
    for offset, feature, colour in (bar for bar in bars if bar[1] in features):
        runs = [p[feature] for p in document["pairs"]]
        coarse = [r["dice_coarse"] if r["status"] == "done" else 0.0 for r in runs]
        affine = [r["dice_affine"] if r["status"] == "done" else 0.0 for r in runs]
        dice.bar(positions + offset, coarse, 0.38, color=colour, label=f"{feature.upper()} +coarse")
        dice.scatter(positions + offset, affine, color="black", s=10, zorder=3)
        for x, run in zip(positions + offset, runs):
            if run["status"] != "done":
                dice.text(x, 0.01, "refused", rotation=90, ha="center", fontsize=7)
    dice.scatter([], [], color="black", s=10, label="affine only")
    dice.set_xticks(positions, labels, fontsize=7)
    dice.set_ylabel("mean organ Dice")
    dice.set_title("Inter-patient, validation pairs")
    dice.legend(fontsize=7)

    shares, counts = [], []
    for feature in features:
        hits = [
            h
            for p in document["pairs"]
            if p[feature]["status"] == "done"
            for h in p[feature]["landmark_hits"].values()
        ]
        shares.append(100 * np.mean(hits) if hits else 0.0)
        counts.append(f"{sum(hits)}/{len(hits)}")
    names = [feature.upper() for feature in features]
    organs.bar(names, shares, color=["#c44e52", "#4c72b0"][: len(features)])
    for x, (share, count) in enumerate(zip(shares, counts)):
        organs.text(x, share + 1, count, ha="center")
    organs.set_ylabel("% of organ centroids matched inside the same organ")
    organs.set_title("Organ landmarks")
    organs.set_ylim(0, 108)
    figure.suptitle(f"SAM ({Path(document['sam_weights']).name}) against MIND-SSC")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(document: dict, figure: Path | None) -> None:
    """Print the two tables; plot them too when ``figure`` is given."""
    settings = document["settings"]
    print(f"\nMatching error under known smooth warps (max {settings['warp_mm']} mm), ", end="")
    print(f"{len(document['cases'])} validation CTs:\n")
    features = features_of(document)
    print(matching_table(document["cases"], features))
    print(f"\nInter-patient, {len(document['pairs'])} seeded validation pairs:\n")
    print(pairs_table(document["pairs"], features))
    if "sam_threshold" in document:
        print(f"\nSAM similarity threshold: {document['sam_threshold']}")
    if figure is not None:
        plot(document, figure)
        print(f"\nfigure: {figure}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        report(json.loads(args.replot.read_text()), args.figure)
        return 0
    openkbp = find_openkbp(args.data)
    patients = validation_patients(openkbp)
    try:
        refuse_training_overlap(args.sam_weights, patients)
    except InputError as err:
        sys.exit(f"error: {err}")
    device = torch.device("cpu")
    extractors = {"sam": SamExtractor(args.sam_weights, device)}
    if not args.skip_mind:
        extractors["mind"] = MindExtractor(device)
    configs = {
        "sam": sam_config(args.sam_weights, args.sam_threshold)
        .with_overrides(args.sam_overrides)
        .matching,
        "mind": RegistrationConfig(features="mind").resolved_for("mind").matching,
    }
    document = {
        "sam_weights": str(args.sam_weights),
        "sam_threshold": configs["sam"].similarity_threshold,
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "cases": [],
        "pairs": [],
    }
    rng = np.random.default_rng(args.seed)
    for i, name in enumerate(rng.choice(patients, size=args.cases, replace=False)):
        ct = read_image(str(openkbp / f"{name}_ct.nii.gz"))
        errors = matching_errors(warp_case(ct, args.warp_mm, args.seed + i), extractors, configs)
        document["cases"].append({"patient": str(name), **errors})
        print(f"warped case {i + 1}/{args.cases} ({name}) done", file=sys.stderr)
    for i, (fixed, moving) in enumerate(draw_pairs(patients, args.pairs, args.seed)):
        entry = {"fixed": fixed, "moving": moving}
        for feature in extractors:
            entry[feature] = run_pair(openkbp, fixed, moving, feature, args)
        document["pairs"].append(entry)
        print(f"pair {i + 1}/{args.pairs} ({fixed} <- {moving}) done", file=sys.stderr)

    report(document, args.figure)
    output = args.output or RESULTS / f"sam_vs_mind-{datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, document)
    print(f"\nsaved: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
