"""Benchmark the registration pipeline on seeded pairs of OpenKBP validation patients.

    python benchmarks/run_pairs.py                     # 20 pairs, MIND and SAM, every stage
    python benchmarks/run_pairs.py --features mind     # MIND only
    python benchmarks/run_pairs.py --quick             # 2 pairs, MIND, full pipeline only

For every feature type and pair it reports Dice (after and before registration), folding, wall time
and peak memory after the affine stage, after the coarse stage and after the whole pipeline. Each
registration runs in a fresh child process (this script in worker mode), so the child's peak RSS
is the peak of that one registration. The figures are printed as markdown tables and saved, with
the pairing, the machine and the configuration, to ``benchmarks/results/run_pairs-<time>.json``.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _common import (
    BENCH,
    REPO,
    RESULTS,
    case_files,
    draw_pairs,
    find_openkbp,
    fmt,
    library_hash,
    machine_info,
    machine_line,
    mean_or_none,
    mean_text,
    median_or_none,
    new_results_prefix,
    numbers,
    parse_overrides,
    peak_rss_kb,
    register_case,
    run_as_worker,
    sd_or_none,
    validation_patients,
    write_json,
)
from _common import run_child as run_child_process

UNTRAINED_NOTE = "untrained weights: timing and memory only, Dice meaningless"
DERIVED_NOTE = "derived from the full run (no separate run)"

# The pipeline variants: configuration overrides that stop it after the affine or coarse stage.
VARIANTS = {
    "affine": {"coarse__enabled": False, "deform__enabled": False, "instance__enabled": False},
    "coarse": {"deform__enabled": False, "instance__enabled": False},
    "full": {},
}
STAGE_LABELS = {"affine": "affine", "coarse": "+coarse", "full": "+instance (full)"}
# Stage timings of the pipeline up to and including the affine stage.
AFFINE_STAGES = ("initial_pose", "prepare", "features", "initial", "matching", "fallback", "affine")
STAGE_ORDER = (
    "initial_pose",
    "prepare",
    "features",
    "initial",
    "matching",
    "fallback",
    "affine",
    "coarse",
    "deform",
    "instance",
    "finish",
)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20, help="number of fixed/moving pairs (20)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the pairing and the registrations (0)"
    )
    parser.add_argument(
        "--features", default="mind,sam", help="comma-separated feature types (mind,sam)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="shared data folder (holding openkbp/) or the openkbp folder itself; "
        "default: $SAME_SHARED_DATA, else ../shared/data from the repository root",
    )
    parser.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device (auto)"
    )
    parser.add_argument(
        "--stages-breakdown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the affine-only and affine+coarse variants of every pair in their own "
        "processes (about twice the time of the full runs alone). Without it, the affine row is "
        "derived from the full run and the +coarse row is not measured. Default: on, off "
        "with --quick",
    )
    parser.add_argument(
        "--sam-weights", type=Path, help="SAM checkpoint (default: the one shipped, if any)"
    )
    parser.add_argument(
        "--sam-width",
        type=float,
        default=0.5,
        help="width of the untrained SAM network used when no SAM weights exist (0.5)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads in each run (default: torch's own)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="configuration override for every run, e.g. --set working_spacing_mm=3 or "
        "--set matching.similarity_threshold=0.5 (VALUE is JSON, else a string); repeatable",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds allowed for one registration run (3600)",
    )
    parser.add_argument("--output", type=Path, help="results JSON (default: benchmarks/results/)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 2 pairs, MIND only, full runs only"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show the children's progress and log output"
    )
    parser.add_argument(
        "--report", type=Path, metavar="RESULTS.json", help="print the tables of a saved run"
    )
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.report:
        return args
    if args.quick:
        args.pairs = 2
        args.features = "mind"
    if args.stages_breakdown is None:
        args.stages_breakdown = not args.quick
    args.features = [f.strip() for f in args.features.split(",") if f.strip()]
    unknown = sorted(set(args.features) - {"mind", "sam"})
    if unknown or not args.features:
        parser.error(f"--features takes mind and/or sam, not {','.join(unknown) or 'nothing'}")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    args.overrides = parse_overrides(args.set, parser.error)
    return args


# --------------------------------------------------------------------------------------------
# Worker: one registration in its own process
# --------------------------------------------------------------------------------------------


def run_worker(job_path: str, out_path: str) -> int:
    """Register one pair as the job says and write what happened to ``out_path`` as JSON."""
    started = time.perf_counter()

    def work(job: dict, out: dict) -> None:
        import logging

        import torch

        logging.basicConfig(
            level=logging.INFO if job.get("verbose") else logging.WARNING,
            format="    %(levelname)s %(name)s: %(message)s",
        )
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        import SAMERegistrationLib  # noqa: F401  (imports are timed apart from the run)

        out["library_hash"] = library_hash()
        out["import_seconds"] = round(time.perf_counter() - started, 3)
        out["torch_threads"] = torch.get_num_threads()
        clock = time.perf_counter()

        def progress(stage: str, done: int, total: int) -> None:
            if done == total and job.get("verbose"):
                print(f"    {stage} done at {time.perf_counter() - clock:.1f} s", file=sys.stderr)

        result = register_case(job["case"], progress=progress, **job["overrides"])
        out["register_seconds"] = round(time.perf_counter() - clock, 3)
        out["maxrss_kb"] = peak_rss_kb()
        out["stages"] = result.stages
        out["metrics"] = result.metrics
        out["device"] = result.device
        out["features"] = result.features
        out["affine"] = result.affine.tolist()
        out["config"] = result.config.to_dict()
        labels = job["case"]["fixed_labels"], job["case"]["moving_labels"]
        out["affine_stage"] = affine_metrics(result, *labels)
        out["process_seconds"] = round(time.perf_counter() - started, 3)

    return run_as_worker(job_path, out_path, work)


def affine_metrics(result, fixed_labels: str, moving_labels: str) -> dict:
    """Dice and folding of the affine stage alone, from the result's affine.

    The affine stage does not depend on the later stages (same inputs, same seed), so this equals
    what an affine-only run reports; the summary compares the two (affine_check).
    """
    import numpy as np
    import SimpleITK as sitk

    from SAMERegistrationLib.evaluate import dice_per_label, mean_dice

    fixed = sitk.ReadImage(fixed_labels)
    moving = sitk.ReadImage(moving_labels)
    warped = sitk.Resample(
        moving, fixed, result.affine_transform(), sitk.sitkNearestNeighbor, 0, moving.GetPixelID()
    )
    reference = sitk.GetArrayFromImage(fixed)
    labels = sorted(
        set(np.unique(reference)) & set(np.unique(sitk.GetArrayViewFromImage(moving))) - {0}
    )
    after = dice_per_label(reference, sitk.GetArrayFromImage(warped), labels)
    det = float(np.linalg.det(np.asarray(result.affine)[:3, :3]))
    return {
        "dice_after": {str(k): v for k, v in after.items()},
        "mean_dice_after": mean_dice(after),
        # An affine folds everywhere or nowhere: where its determinant is not positive.
        "folding_percent": 100.0 if det <= 0 else 0.0,
        "determinant": det,
    }


def sam_weights(args: argparse.Namespace, scratch: Path) -> tuple[Path, str, bool]:
    """The SAM checkpoint to use, a label for it, and whether it is untrained."""
    from SAMERegistrationLib.features.sam import default_weights

    if args.sam_weights:
        return args.sam_weights.resolve(), str(args.sam_weights), False
    shipped = default_weights()
    if shipped is not None:
        return Path(shipped), f"shipped ({shipped})", False
    import torch

    from SAMERegistrationLib.features.sam_network import SAMNetwork, save_sam_checkpoint

    torch.manual_seed(args.seed)
    path = scratch / f"sam_untrained_width{args.sam_width:g}_seed{args.seed}.pt"
    save_sam_checkpoint(
        SAMNetwork(width=args.sam_width), path, meta={"note": "untrained, benchmark only"}
    )
    return path, f"untrained, width {args.sam_width:g}, seed {args.seed}", True


# --------------------------------------------------------------------------------------------
# Running the children
# --------------------------------------------------------------------------------------------


def snapshot_code(scratch: Path) -> Path:
    """Copy the library and this script to ``scratch``, laid out as in the repository.

    The children run the copy, so every run of one benchmark uses the same code even when the
    working tree is edited while the benchmark runs. The models folder (weights) is linked.
    """
    root = scratch / "code"
    library = REPO / "SAMERegistrationLib"
    shutil.copytree(
        library, root / library.name, ignore=shutil.ignore_patterns("__pycache__", "models")
    )
    if (library / "models").is_dir():
        (root / library.name / "models").symlink_to(library / "models", target_is_directory=True)
    (root / "benchmarks").mkdir()
    for script in (Path(__file__).resolve(), BENCH / "_common.py"):
        shutil.copy2(script, root / "benchmarks" / script.name)
    return root


def run_child(job: dict, scratch: Path, code: Path, timeout: float, verbose: bool) -> dict:
    """Run one registration in a fresh Python process on the snapshot ``code``; its report."""
    pythonpath = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH", "")]))
    script = code / "benchmarks" / "run_pairs.py"
    report, wall = run_child_process(
        script, job, scratch, timeout, {"PYTHONPATH": pythonpath}, verbose
    )
    report["child_wall_seconds"] = wall
    return report


def make_rows(feature: str, weights: dict, index: int, pair, variant: str, report: dict) -> list:
    """Rows for the results from one child's report (the full run also yields a derived row)."""
    base = {
        "feature": feature,
        "weights": weights["label"],
        "untrained": weights["untrained"],
        "pair": index,
        "fixed": pair[0],
        "moving": pair[1],
        "device": report.get("device"),
        "library_hash": report.get("library_hash"),
        "torch_threads": report.get("torch_threads"),
        "child_wall_seconds": report.get("child_wall_seconds"),
        "load_average_after": list(os.getloadavg()),
    }
    row = {**base, "stage": variant, "source": "run", "status": report["status"]}
    if report["status"] != "ok":
        row["error"] = report.get("error")
        row["detail"] = report.get("traceback") or report.get("log")
        row["peak_rss_gb"] = _gb(report.get("maxrss_kb"))
        if variant != "full":
            return [row]
        derived = {**row, "stage": "affine", "source": "derived", "peak_rss_gb": None}
        return [row, derived]
    metrics = report["metrics"]
    stages = report["stages"]
    row.update(
        mean_dice_before=metrics.get("mean_dice_before"),
        mean_dice_after=metrics.get("mean_dice_after"),
        dice_before=metrics.get("dice_before"),
        dice_after=metrics.get("dice_after"),
        folding_percent=metrics.get("folding_percent"),
        seconds=report["register_seconds"],
        stage_seconds={k: v["seconds"] for k, v in stages.items() if "seconds" in v},
        stage_status={k: v.get("status", "done") for k, v in stages.items()},
        stages=stages,
        peak_rss_gb=_gb(report["maxrss_kb"]),
        import_seconds=report.get("import_seconds"),
        affine=report.get("affine"),
        affine_stage=report.get("affine_stage"),
        config=report.get("config"),
    )
    rows = [row]
    if variant == "full":
        affine = report["affine_stage"]
        rows.append(
            {
                **base,
                "stage": "affine",
                "source": "derived",
                "status": "ok",
                "mean_dice_before": metrics.get("mean_dice_before"),
                "mean_dice_after": affine["mean_dice_after"],
                "dice_after": affine["dice_after"],
                "folding_percent": affine["folding_percent"],
                "seconds": round(
                    sum(stages.get(s, {}).get("seconds", 0.0) for s in AFFINE_STAGES), 3
                ),
                "peak_rss_gb": None,
            }
        )
    return rows


def _gb(kb) -> float | None:
    return None if kb is None else round(kb / 2**20, 3)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def summary_rows(rows: list[dict], features: list[str], breakdown: bool, weights: dict) -> list:
    """One summary per feature x stage: the figures of the table, as numbers."""
    out = []
    for feature in features:
        for stage in VARIANTS:
            source = "run" if breakdown or stage == "full" else "derived"
            if stage == "coarse" and not breakdown:
                chosen = []
            else:
                chosen = [
                    r
                    for r in rows
                    if r["feature"] == feature and r["stage"] == stage and r["source"] == source
                ]
            ok = [r for r in chosen if r["status"] == "ok"]
            dice = numbers(r.get("mean_dice_after") for r in ok)
            notes = []
            if weights.get(feature, {}).get("untrained"):
                notes.append(UNTRAINED_NOTE)
            if source == "derived" and stage == "affine":
                notes.append(DERIVED_NOTE)
            if stage == "coarse" and not breakdown:
                notes.append("not measured (--no-stages-breakdown)")
            out.append(
                {
                    "feature": feature,
                    "stage": stage,
                    "source": source,
                    "runs": len(chosen),
                    "ok": len(ok),
                    "dice_mean": mean_or_none(dice),
                    "dice_sd": sd_or_none(dice),
                    "dice_before_mean": mean_or_none(r.get("mean_dice_before") for r in ok),
                    "folding_percent_mean": mean_or_none(r.get("folding_percent") for r in ok),
                    "seconds_mean": mean_or_none(r.get("seconds") for r in ok),
                    "seconds_median": median_or_none(r.get("seconds") for r in ok),
                    "peak_rss_gb_max": max(
                        numbers(r.get("peak_rss_gb") for r in chosen), default=None
                    ),
                    "note": "; ".join(notes),
                }
            )
    return out


def results_table(summaries: list[dict]) -> str:
    lines = [
        "| features | stage | ok/runs | Dice after (mean ± sd) | Dice before | folding % (mean) "
        "| time s/pair (mean) | time s (median) | peak RSS GB (max) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        dice = fmt(s["dice_mean"], 3)
        if s["dice_sd"] is not None:
            dice += f" ± {s['dice_sd']:.3f}"
        lines.append(
            f"| {s['feature']} | {STAGE_LABELS[s['stage']]} | {s['ok']}/{s['runs']} | {dice} "
            f"| {fmt(s['dice_before_mean'], 3)} | {fmt(s['folding_percent_mean'], 3)} "
            f"| {fmt(s['seconds_mean'], 1)} | {fmt(s['seconds_median'], 1)} "
            f"| {fmt(s['peak_rss_gb_max'], 2)} | {s['note']} |"
        )
    return "\n".join(lines)


def stage_time_table(rows: list[dict], features: list[str]) -> str:
    """Mean seconds of each pipeline stage in the full runs (from result.stages)."""
    lines = [
        "| features | " + " | ".join(STAGE_ORDER) + " | sum of stages | register() wall |",
        "|---|" + "---|" * (len(STAGE_ORDER) + 2),
    ]
    for feature in features:
        full = [
            r
            for r in rows
            if r["feature"] == feature
            and r["stage"] == "full"
            and r["source"] == "run"
            and r["status"] == "ok"
        ]
        if not full:
            continue
        cells = []
        for stage in STAGE_ORDER:
            values = [r["stage_seconds"][stage] for r in full if stage in r["stage_seconds"]]
            cells.append(mean_text(values, 1) if values else "skipped")
        total = [sum(r["stage_seconds"].values()) for r in full]
        cells += [mean_text(total, 1), mean_text((r.get("seconds") for r in full), 1)]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contention_warning(rows: list[dict], machine: dict) -> str | None:
    """A warning when the 1-minute load average exceeded the cores during the runs."""
    loads = [r["load_average_after"][0] for r in rows if r.get("load_average_after")]
    cores = machine.get("usable_cores") or machine.get("cores") or 1
    peak = max(loads, default=0.0)
    if peak <= cores + 0.5:
        return None
    return (
        f"Warning: the 1-minute load average reached {peak:.1f} on {cores} cores during the runs "
        f"(median {statistics.median(loads):.1f}): other processes shared the CPU, so the times "
        "are inflated."
    )


def affine_check(rows: list[dict]) -> float | None:
    """Largest Dice difference between affine-only runs and the affine of the full runs."""
    derived = {
        (r["feature"], r["pair"]): r["mean_dice_after"]
        for r in rows
        if r["source"] == "derived" and r["status"] == "ok"
    }
    diffs = []
    for r in rows:
        if r["stage"] != "affine" or r["source"] != "run" or r["status"] != "ok":
            continue
        other = derived.get((r["feature"], r["pair"]))
        if other is not None and not math.isnan(other) and r["mean_dice_after"] is not None:
            diffs.append(abs(other - r["mean_dice_after"]))
    return max(diffs) if diffs else None


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(*args.worker)
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0

    openkbp = find_openkbp(args.data)
    patients = validation_patients(openkbp)
    pairs = draw_pairs(patients, args.pairs, args.seed)
    output = args.output or new_results_prefix(RESULTS, "run_pairs").with_suffix(".json")
    output.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    variants = list(VARIANTS) if args.stages_breakdown else ["full"]

    print(f"OpenKBP data: {openkbp} ({len(patients)} validation patients with labels)")
    print(f"Pairing (seed {args.seed}, {len(pairs)} pairs, fixed <- moving):")
    for i, (fixed, moving) in enumerate(pairs, 1):
        print(f"  {i:2d}. {fixed} <- {moving}")
    print(f"Variants per pair: {', '.join(variants)}; features: {', '.join(args.features)}")
    if args.overrides:
        print(f"Configuration overrides for every run: {json.dumps(args.overrides)}")
    print(machine_line(machine, args.device, []))
    print(f"Results: {output}\n", flush=True)

    rows: list[dict] = []
    weights: dict[str, dict] = {}
    document = {
        "script": "benchmarks/run_pairs.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": datetime.now().isoformat(timespec="seconds"),
        "complete": False,
        "options": {
            "pairs": args.pairs,
            "seed": args.seed,
            "features": args.features,
            "device": args.device,
            "stages_breakdown": args.stages_breakdown,
            "sam_width": args.sam_width,
            "threads": args.threads,
            "config_overrides": args.overrides,
            "timeout": args.timeout,
            "quick": args.quick,
        },
        "data": str(openkbp),
        "patients": patients,
        "pairing": [{"pair": i, "fixed": f, "moving": m} for i, (f, m) in enumerate(pairs, 1)],
        "variants": {v: VARIANTS[v] for v in variants},
        "machine": machine,
        "weights": weights,
        "rows": rows,
    }

    def save() -> None:
        write_json(output, document)

    interrupted = False
    signal.signal(signal.SIGTERM, _interrupt)  # kill PID: stop, summarise and save like Ctrl-C
    with tempfile.TemporaryDirectory(prefix="run_pairs-") as scratch_name:
        scratch = Path(scratch_name)
        code = snapshot_code(scratch)
        document["library_hash_at_start"] = library_hash(code)
        for feature in args.features:
            if feature == "sam":
                path, label, untrained = sam_weights(args, scratch)
                weights["sam"] = {"path": str(path), "label": label, "untrained": untrained}
                if untrained:
                    print(f"SAM: {label} -> {UNTRAINED_NOTE}", flush=True)
            else:
                weights[feature] = {"path": None, "label": "none (hand-crafted)"}
                weights[feature]["untrained"] = False
            try:
                for index, pair in enumerate(pairs, 1):
                    for variant in variants:
                        overrides = {k.replace(".", "__"): v for k, v in args.overrides.items()}
                        overrides.update(features=feature, device=args.device, seed=args.seed)
                        overrides.update(VARIANTS[variant])
                        if feature == "sam":
                            overrides["sam_weights"] = weights["sam"]["path"]
                        job = {
                            "case": case_files(openkbp, *pair),
                            "overrides": overrides,
                            "threads": args.threads,
                            "verbose": args.verbose,
                        }
                        child = run_child(job, scratch, code, args.timeout, args.verbose)
                        new = make_rows(feature, weights[feature], index, pair, variant, child)
                        rows.extend(new)
                        print(progress_line(new[0], len(pairs), child), flush=True)
                        save()
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: summarising the runs so far", flush=True)
                break

    machine["load_average_at_end"] = list(os.getloadavg())
    document.update(complete=not interrupted, finished=datetime.now().isoformat(timespec="seconds"))
    document.update(report(document))
    save()
    print(f"\nSaved {output}")
    return 130 if interrupted else 0


def report(document: dict) -> dict:
    """Print the tables and warnings of a results document; return what to add to it."""
    rows, options, machine = document["rows"], document["options"], document["machine"]
    summaries = summary_rows(
        rows, options["features"], options["stages_breakdown"], document["weights"]
    )
    devices = [r.get("device") for r in rows]
    table = results_table(summaries)
    stage_table = stage_time_table(rows, options["features"])
    check = affine_check(rows)
    warning = contention_warning(rows, machine)
    failures = [r for r in rows if r["status"] != "ok" and r["source"] == "run"]
    versions = sorted({r["library_hash"] for r in rows if r.get("library_hash")})
    overrides = options.get("config_overrides")

    print("\n## Results\n")
    print(machine_line(machine, options["device"], devices))
    print(
        f"Pairs: {len(document['pairing'])} OpenKBP validation pairs, seed {options['seed']}; "
        "labels scored: those present in both images. Time: register() wall clock in the child "
        "process (imports excluded); peak RSS: ru_maxrss of that process."
    )
    if overrides:
        print(f"Configuration overrides for every run: {json.dumps(overrides)}")
    print()
    print(table)
    print("\nMean seconds per stage in the full runs (result.stages):\n")
    print(stage_table if stage_table.count("\n") > 1 else "(no successful full runs)")
    if len(versions) > 1:
        print(
            f"\nWarning: the library's source changed during the benchmark ({len(versions)} "
            "versions, see library_hash in the rows): the runs are not all of the same code."
        )
    if warning:
        print(f"\n{warning}")
    if check is not None:
        print(
            f"\nAffine check: max |Dice(affine-only run) - Dice(affine of full run)| = {check:.2e}"
        )
    if failures:
        print(f"\nFailed runs ({len(failures)}):")
        for r in failures:
            print(f"  {r['feature']} {r['stage']} pair {r['pair']} {r['fixed']} <- {r['moving']}")
            print(f"    {r['error']}")
    return {
        "summary": summaries,
        "affine_check_max_dice_difference": check,
        "contention_warning": warning,
        "library_hashes": versions,
        "table_markdown": table,
        "stage_time_table_markdown": stage_table,
        "devices": sorted(set(filter(None, devices))),
    }


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def progress_line(row: dict, total: int, report: dict) -> str:
    head = f"[{row['feature']} {row['pair']:2d}/{total} {row['stage']:6s}] {row['fixed']} <- {row['moving']}"
    if row["status"] != "ok":
        return f"{head}  FAILED {row['error'][:300]}"
    return (
        f"{head}  Dice {row['mean_dice_before']:.3f} -> {row['mean_dice_after']:.3f}  "
        f"fold {row['folding_percent']:.3f}%  {row['seconds']:.1f} s "
        f"(process {report['child_wall_seconds']:.1f} s)  {row['peak_rss_gb']:.2f} GB  "
        f"load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
