"""Ablation of SAM-deform on seeded OpenKBP validation pairs.

    python benchmarks/ablation_deform.py --deform full=deform_full.pth \\
        --deform no-sam-loss=deform_nosam.pth --deform no-correlation=deform_nocorr.pth \\
        --deform dvf=deform_dvf.pth --features sam --pairs 10

Rows: the pipeline up to the coarse stage; + SAM-deform with each given weights file (instance
optimisation off); + instance optimisation without SAM-deform; and the whole pipeline (coarse ->
deform with the first weights file -> instance). Per row: mean Dice over pairs, folding % of the
whole map and of the deform stage's own field, and wall time per pair. The weights files are
trained beforehand with ``same-register train-deform`` (see benchmarks/README.md); the pairs are
those of ``run_pairs.py`` (same seed, same pairs). Prints a markdown table and saves a JSON file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from _common import (
    RESULTS,
    case_files,
    draw_pairs,
    find_openkbp,
    markdown_table,
    mean_sd_text,
    mean_text,
    parse_overrides,
    register_case,
    validation_patients,
    write_json,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--deform",
        action="append",
        default=[],
        metavar="NAME=WEIGHTS",
        help="a SAM-deform weights file and its row name (repeatable; the first one also runs "
        "with instance optimisation; default: the shipped network as 'shipped')",
    )
    parser.add_argument("--pairs", type=int, default=10, help="validation pairs (10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing (0)")
    parser.add_argument("--features", choices=["mind", "sam"], default="sam")
    parser.add_argument("--sam-weights", type=Path, help="SAM checkpoint (default: shipped)")
    parser.add_argument("--data", type=Path, help="shared data folder or its openkbp/")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="configuration override for every run (VALUE is JSON, else a string)",
    )
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results/)")
    parser.add_argument(
        "--figure", type=Path, help="also plot Dice and folding per row to this PNG (matplotlib)"
    )
    args = parser.parse_args(argv)
    if not args.deform:
        from SAMERegistrationLib.stages.deform import shipped_weights

        if shipped_weights() is None:
            parser.error("no SAM-deform network ships with this installation: give --deform")
        args.deform = [f"shipped={shipped_weights()}"]
    args.variants = {}
    for item in args.deform:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_file():
            parser.error(f"--deform takes NAME=EXISTING_WEIGHTS_FILE, not '{item}'")
        args.variants[name] = Path(path)
    args.overrides = parse_overrides(args.set, parser.error)
    return args


def describe(weights: Path) -> str:
    from SAMERegistrationLib.deform_net.checkpoint import load_deform_weights

    meta = load_deform_weights(weights).meta
    return (
        f"{meta['variant']}, correlation {'on' if meta['correlation'] else 'off'}, SAM loss "
        f"{meta.get('sam_loss_weight', '?')}, {meta['features']} features"
    )


def rows_to_run(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(row name, configuration overrides) in table order."""
    off = {"deform.enabled": False, "instance.enabled": False}
    rows = [("coarse", off)]
    for name, path in args.variants.items():
        rows.append((f"+deform {name}", {"deform.weights": str(path), "instance.enabled": False}))
    rows.append(("+instance (no deform)", {"deform.enabled": False}))
    first_name, first = next(iter(args.variants.items()))
    rows.append((f"+deform {first_name} +instance", {"deform.weights": str(first)}))
    return rows


def run(args: argparse.Namespace) -> dict:
    import torch

    from SAMERegistrationLib import RegistrationConfig
    from SAMERegistrationLib.errors import SameRegistrationError

    if args.threads:
        torch.set_num_threads(args.threads)
    openkbp = find_openkbp(args.data)
    pairs = draw_pairs(validation_patients(openkbp), args.pairs, args.seed)
    base = {"features": args.features, "device": args.device, **args.overrides}
    if args.sam_weights:
        base["sam_weights"] = str(args.sam_weights)
    results = []
    for row, overrides in rows_to_run(args):
        config = RegistrationConfig().with_overrides({**base, **overrides})
        for fixed, moving in pairs:
            entry = {"row": row, "fixed": fixed, "moving": moving}
            started = time.perf_counter()
            try:
                result = register_case(case_files(openkbp, fixed, moving), config=config)
            except SameRegistrationError as err:
                entry.update(status="failed", error=str(err))
            else:
                deform = result.stages["deform"]
                entry.update(
                    status="ok",
                    dice=result.metrics["mean_dice_after"],
                    dice_before=result.metrics["mean_dice_before"],
                    folding=result.metrics["folding_percent"],
                    deform_folding=deform.get("folding_percent"),
                    seconds=time.perf_counter() - started,
                )
            results.append(entry)
            print(f"{row:28s} {fixed} <- {moving}: {_short(entry)}", file=sys.stderr, flush=True)
    return {
        "pairs": pairs,
        "rows": results,
        "variants": {k: str(v) for k, v in args.variants.items()},
    }


def _short(entry: dict) -> str:
    if entry["status"] != "ok":
        return "failed: " + entry["error"][:80]
    return f"Dice {entry['dice']:.3f}, folding {entry['folding']:.3f} %, {entry['seconds']:.1f} s"


def table(document: dict, variants: dict[str, str]) -> str:
    head = ["row", "ok/runs", "Dice (mean ± sd)", "folding % (whole map)"]
    head += ["folding % (deform field)", "time s/pair"]
    rows = []
    for name, entries, ok in _by_row(document):
        deform = [e["deform_folding"] for e in ok if e["deform_folding"] is not None]
        rows.append(
            [
                name,
                f"{len(ok)}/{len(entries)}",
                mean_sd_text(e["dice"] for e in ok),
                mean_text(e["folding"] for e in ok),
                mean_text(deform),
                mean_text((e["seconds"] for e in ok), 1),
            ]
        )
    notes = [f"- {name}: {text}" for name, text in variants.items()]
    return "\n".join([markdown_table(head, rows), "", *notes])


def _by_row(document: dict) -> list[tuple[str, list[dict], list[dict]]]:
    """(row name, its runs, its successful runs) in table order."""
    names = list(dict.fromkeys(entry["row"] for entry in document["rows"]))
    grouped = []
    for name in names:
        entries = [e for e in document["rows"] if e["row"] == name]
        grouped.append((name, entries, [e for e in entries if e["status"] == "ok"]))
    return grouped


def plot(document: dict, path: Path) -> None:
    """Mean Dice (± sd) per row as bars, each labelled with its folding % and time per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _by_row(document)
    names = [name for name, _, _ in rows]
    stats = []
    for _, _, ok in rows:
        dice = [e["dice"] for e in ok]
        stats.append(
            (
                statistics.mean(dice) if dice else 0.0,
                statistics.stdev(dice) if len(dice) > 1 else 0.0,
                mean_text([e["folding"] for e in ok], 2),
                mean_text([e["seconds"] for e in ok], 0),
            )
        )
    figure, axes = plt.subplots(figsize=(8, 0.6 * len(names) + 1.2))
    positions = range(len(names))
    axes.barh(positions, [s[0] for s in stats], xerr=[s[1] for s in stats], color="#4c72b0")
    for y, (mean, spread, folding, seconds) in zip(positions, stats):
        axes.text(mean + spread + 0.01, y, f"fold {folding} %, {seconds} s", va="center")
    axes.set_yticks(list(positions), names)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel(
        f"mean Dice (± sd) over the registered runs of {len(document['pairs'])} validation pairs"
    )
    axes.set_title("SAM-deform ablation")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    variants = {name: describe(path) for name, path in args.variants.items()}
    document = run(args)
    document["options"] = {k: str(v) for k, v in vars(args).items() if k != "variants"}
    print(table(document, variants))
    if args.figure:
        plot(document, args.figure)
        print(f"figure {args.figure}", file=sys.stderr)
    output = args.output or RESULTS / f"ablation_deform-{datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, document, indent=2)
    print(f"\nsaved {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
