"""Instance optimisation's smoothness weight, compared on seeded OpenKBP pairs.

    python benchmarks/tune_instance.py                          # 10 training pairs, 4 weights
    python benchmarks/tune_instance.py --split validation --pairs 20 --smoothness 10000 3000

Each pair is registered once up to the instance stage (default settings otherwise, MIND
features); then instance optimisation runs from that same alignment once per smoothness weight,
each result unfolded as the pipeline does, its labels warped and scored. So the rows differ in the
weight alone. Training pairs (the default) keep the choice of a default off the validation
patients that the other benchmarks report on. Prints a table (mean Dice, the smallest change
against the first weight, folding before unfolding, seconds of the stage) and writes it with
every pair's figures to ``benchmarks/results/tune_instance-<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from _common import (
    RESULTS,
    case_files,
    draw_pairs,
    find_openkbp,
    fmt,
    markdown_table,
    mean_or_none,
    save_table_run,
    split_patients,
)


def score_pair(case: dict, weights: list[float]) -> dict:
    """Dice, folding and seconds of instance optimisation at each smoothness weight."""
    import SimpleITK as sitk

    from SAMERegistrationLib import register
    from SAMERegistrationLib.evaluate import dice_per_label, mean_dice
    from SAMERegistrationLib.stages.instance import optimise_instance

    # No instance step (0 iterations gain nothing, so the stage keeps the alignment), but the stage
    # on: the features then carry the descriptors it compares.
    before = register(case["fixed"], case["moving"], features="mind", instance__iterations=0)
    assert before.stages["instance"]["status"] == "rejected"
    if before.stages["initial_pose"].get("reoriented"):
        # The stored features belong to the re-oriented moving scan, the alignment to the original.
        return {"skipped": "moving scan re-oriented by the initial pose"}
    fixed_labels = sitk.ReadImage(case["fixed_labels"])
    moving_labels = sitk.ReadImage(case["moving_labels"])
    reference = sitk.GetArrayFromImage(fixed_labels)
    labels = sorted(
        set(reference.ravel()) & set(sitk.GetArrayViewFromImage(moving_labels).ravel()) - {0}
    )
    rows = {}
    for weight in weights:
        config = before.config.with_overrides({"instance.smoothness": weight})
        clock = time.perf_counter()
        refined, info = optimise_instance(
            before.fixed_features, before.moving_features, before.alignment, config.instance
        )
        seconds = time.perf_counter() - clock
        result = copy.copy(before)
        folding = refined.folding_percent()
        if folding > 0 and config.unfold_passes:
            refined, _ = refined.unfolded(config.unfold_passes)
        result.alignment = refined
        warped = sitk.GetArrayFromImage(result.warp(moving_labels, labels=True))
        rows[str(weight)] = {
            "mean_dice": mean_dice(dice_per_label(reference, warped, labels)),
            "folding_before_unfolding": folding,
            "seconds": seconds,
            "status": info.get("status", "done"),
        }
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("train", "validation"), default="train")
    parser.add_argument("--pairs", type=int, default=10, help="number of seeded pairs (10)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the pairing (7)")
    parser.add_argument(
        "--smoothness", type=float, nargs="+", default=[10000.0, 3000.0, 1000.0, 300.0]
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--data", type=Path, help="shared data folder or its openkbp/")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="benchmarks/results/")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    openkbp = find_openkbp(args.data)
    pairs = draw_pairs(split_patients(openkbp, args.split), args.pairs, args.seed)
    results = []
    for n, (fixed, moving) in enumerate(pairs, 1):
        found = score_pair(case_files(openkbp, fixed, moving), args.smoothness)
        results.append({"fixed": fixed, "moving": moving, **found})
        summary = found.get("skipped") or ", ".join(
            f"{w}: {r['mean_dice']:.3f}" for w, r in found["rows"].items()
        )
        print(f"[{n}/{len(pairs)}] {fixed} <- {moving}: {summary}", flush=True)
    scored = [r for r in results if "rows" in r]
    first = str(args.smoothness[0])
    table = []
    for weight in map(str, args.smoothness):
        rows = [r["rows"][weight] for r in scored]
        change = [r["rows"][weight]["mean_dice"] - r["rows"][first]["mean_dice"] for r in scored]
        table.append([
            weight, fmt(mean_or_none(x["mean_dice"] for x in rows), 4),
            fmt(min(change, default=None), 3),
            fmt(max((x["folding_before_unfolding"] for x in rows), default=None), 3),
            fmt(mean_or_none(x["seconds"] for x in rows), 1),
        ])  # fmt: skip
    head = ["smoothness", "mean Dice", f"smallest change vs {first}", "max folding % (before unfolding)", "s (stage)"]  # fmt: skip
    text = markdown_table(head, table)
    print(f"\n{len(scored)} of {len(pairs)} {args.split} pairs (seed {args.seed}) scored\n\n{text}")
    save_table_run(args.output_dir, "tune_instance", {
        "options": vars(args) | {"data": str(openkbp), "output_dir": str(args.output_dir)},
        "pairs": results, "table_markdown": text,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
