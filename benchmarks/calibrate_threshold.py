"""Calibrate the similarity threshold of a SAM model and write it into the model's record.

    python benchmarks/calibrate_threshold.py                     # the shipped model, print only
    python benchmarks/calibrate_threshold.py --write             # also write it into the record
    python benchmarks/calibrate_threshold.py --weights my.pt --pairs 8 --keep-share 0.4

SSCC keeps a match when its similarity exceeds a threshold. SAME's 0.7 was tuned for the
official SAM model; a model whose embeddings are less spread out scores almost every match above
it, wrong ones included, so the threshold filters nothing. This script draws seeded pairs of
OpenKBP *training* patients (never validation patients, on which the pipeline is evaluated),
finds the cycle-consistent matches of the pipeline's grid points across each pair (global search,
no threshold, no ratio test, within the region both scans cover after the initial translation
search), and takes as threshold the similarity that the best ``--keep-share`` of those matches
exceed. It prints, for a few thresholds, the share of grid points kept and, of the kept matches
that start in an organ, the share that end in the same organ (organ labels of the training scans;
reported, not used for the choice). ``--write`` stores the threshold and how it was found in the
record (``NAME.json`` beside ``NAME.pt``); the weights file and its SHA256 do not change.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from run_pairs import draw_pairs, find_openkbp  # noqa: E402

from SAMERegistrationLib.config import FEATURE_DEFAULTS, MatchingConfig  # noqa: E402
from SAMERegistrationLib.features.sam import SamExtractor, default_weights  # noqa: E402
from SAMERegistrationLib.grid import Grid  # noqa: E402
from SAMERegistrationLib.image import read_image, to_working_grid  # noqa: E402
from SAMERegistrationLib.matching import find_matches  # noqa: E402
from SAMERegistrationLib.shipped import file_sha256, read_record  # noqa: E402
from SAMERegistrationLib.stages.initial import search_translation  # noqa: E402

REPORTED_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, help="SAM checkpoint (default: the shipped one)")
    parser.add_argument("--pairs", type=int, default=6, help="seeded training pairs (6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing (0)")
    parser.add_argument(
        "--keep-share", type=float, default=0.5, help="share of stable matches to keep (0.5)"
    )
    parser.add_argument("--data", type=Path, help="shared data folder or its openkbp folder")
    parser.add_argument("--write", action="store_true", help="write the threshold into the record")
    args = parser.parse_args(argv)
    args.weights = args.weights or default_weights()
    if args.weights is None:
        parser.error("no SAM weights ship with this installation: pass --weights")
    if not 0.0 < args.keep_share <= 1.0:
        parser.error("--keep-share must lie in (0, 1]")
    return args


def training_patients(openkbp: Path) -> list[str]:
    names = [p.name[: -len("_ct.nii.gz")] for p in openkbp.glob("train_pt_*_ct.nii.gz")]
    names = [n for n in names if (openkbp / f"{n}_label.nii.gz").is_file()]
    return sorted(names, key=lambda n: int(re.findall(r"\d+", n)[-1]))


def stable_matches(extractor: SamExtractor, openkbp: Path, fixed: str, moving: str) -> dict:
    """Similarities of the cycle-consistent matches of one pair, and whether each lands in the
    same organ (-1: starts outside the organs the two scans share)."""
    images = {n: read_image(str(openkbp / f"{n}_ct.nii.gz")) for n in (fixed, moving)}
    maps = {n: extractor.extract(to_working_grid(images[n], 2.0)) for n in (fixed, moving)}
    prior, _ = search_translation(maps[fixed], maps[moving])
    config = MatchingConfig(
        similarity_threshold=-1.0,
        ratio_max=1.0,
        overlap_margin_mm=FEATURE_DEFAULTS["sam"]["matching.overlap_margin_mm"],
    )
    matches = find_matches(maps[fixed], maps[moving], config, prior, None)
    labels = {n: sitk.ReadImage(str(openkbp / f"{n}_label.nii.gz")) for n in (fixed, moving)}
    at_fixed = _labels_at(labels[fixed], matches.fixed)
    at_moving = _labels_at(labels[moving], matches.moving)
    shared = set(np.unique(sitk.GetArrayViewFromImage(labels[fixed])).tolist()) - {0}
    organ = np.where(np.isin(at_moving, sorted(shared)), (at_fixed == at_moving).astype(int), -1)
    return {"similarity": matches.similarity, "same_organ": organ, "queried": matches.queried}


def _labels_at(labels: sitk.Image, points: np.ndarray) -> np.ndarray:
    index = np.round(Grid.from_sitk(labels).physical_to_index(points)).astype(int)
    inside = np.all((index >= 0) & (index < np.array(labels.GetSize())), axis=1)
    array = sitk.GetArrayViewFromImage(labels)
    found = np.zeros(len(points), dtype=np.int64)
    found[inside] = array[index[inside, 2], index[inside, 1], index[inside, 0]]
    return found


def calibrated_threshold(similarities: np.ndarray, keep_share: float) -> float:
    """The similarity that the best ``keep_share`` of the stable matches exceed."""
    return float(np.quantile(similarities, 1.0 - keep_share))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    openkbp = find_openkbp(args.data)
    extractor = SamExtractor(args.weights, torch.device("cpu"))
    pairs = draw_pairs(training_patients(openkbp), args.pairs, args.seed)
    found = []
    for i, (fixed, moving) in enumerate(pairs):
        found.append(stable_matches(extractor, openkbp, fixed, moving))
        print(f"pair {i + 1}/{len(pairs)} ({fixed} <- {moving}) done", file=sys.stderr)
    similarity = np.concatenate([f["similarity"] for f in found])
    organ = np.concatenate([f["same_organ"] for f in found])
    queried = sum(f["queried"] for f in found)
    threshold = round(calibrated_threshold(similarity, args.keep_share), 3)

    print(f"\n{len(pairs)} training pairs, {queried} grid points, {len(similarity)} stable:\n")
    print("| threshold | grid points kept | of those in an organ: same organ |")
    print("|---|---|---|")
    rows = [round(float(np.quantile(similarity, q)), 3) for q in REPORTED_QUANTILES]
    for value in sorted({*rows, 0.7, threshold}):
        kept = similarity > value
        in_organ = kept & (organ >= 0)
        same, count = int((organ[in_organ] == 1).sum()), int(in_organ.sum())
        share = f"{100 * same / count:.1f} % ({same}/{count})" if count else "n/a"
        mark = " (calibrated)" if value == threshold else ""
        print(f"| {value:.3f}{mark} | {100 * kept.sum() / queried:.1f} % | {share} |")
    print(f"\ncalibrated threshold: {threshold}")

    if args.write:
        record_path = args.weights.with_suffix(".json")
        record = read_record(record_path)
        if record.get("sha256") != file_sha256(args.weights):
            sys.exit(f"error: {record_path} is missing or not the record of {args.weights}")
        record["similarity_threshold"] = threshold
        record["similarity_threshold_calibration"] = {
            "method": "quantile of cross-patient SSCC best-match similarities",
            "keep_share": args.keep_share,
            "pairs": [list(p) for p in pairs],
            "seed": args.seed,
            "stable_matches": int(len(similarity)),
            "command": "python benchmarks/calibrate_threshold.py " + " ".join(argv or sys.argv[1:]),
        }
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"written: {record_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
