"""The kit's markdown report: one table per part, from the report dictionary ``run.py`` builds."""

from __future__ import annotations

STAGE_COLUMNS = ("features", "initial", "matching", "affine", "coarse", "deform", "instance")


def _number(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    machine = report["machine"]
    where = machine.get("gpu") or f"CPU ({machine['cpu_threads']} threads)"
    lines = [
        f"# GPU kit report ({report['mode']})",
        "",
        f"Device {report.get('device')}: {where}; torch {machine['torch']} (CUDA build "
        f"{machine['cuda_build']}); started {report['started']}; budget {report['budget_s']:g} s"
        f"; total {report.get('total_s', '—')} s.",
        "",
    ]
    tests = report.get("tests")
    if tests:
        lines += ["## CUDA tests", "", f"{tests.get('summary') or tests}", ""]
    for variant, run in (report.get("bench") or {}).get("variants", {}).items():
        lines += _bench_tables(variant, run)
    train = report.get("train")
    if train:
        lines += ["## SAM training", ""]
        if "error" in train:
            lines += [f"failed: {train['error']}", ""]
        else:
            settings = train["settings"]
            lines += [
                "| variant | width | pairs/step | precision | iterations | s | steps/s | final "
                "loss | peak GPU MiB | weights |",
                "|---|---|---|---|---|---|---|---|---|---|",
                f"| {settings['variant']} | {settings['width']} | {settings['batch']} | "
                f"{settings['precision']} | {train['iterations']} | {train['seconds']} | "
                f"{train['steps_per_s']} | {train['final_loss']} | {train.get('peak_gpu_mb', '—')} "
                f"| {' + '.join(train['weights']['shards'])} (sha256 "
                f"{train['weights']['sha256'][:12]}…) |",
                "",
            ]
            if train.get("pair_maps"):
                lines += [
                    f"Cross-patient crop pairs: {train['cross_pairs']} drawn through "
                    f"{train['pair_maps']} packed maps (share {settings['cross_share']}).",
                    "",
                ]
    for part in ("tests", "bench", "train"):
        if isinstance(report.get(part), dict) and "error" in report[part] and part != "train":
            lines += [f"**{part} failed**: {report[part]['error']}", ""]
    return "\n".join(lines) + "\n"


def _bench_tables(variant: str, run: dict) -> list[str]:
    if "error" in run:
        return [f"## Stages, {variant}", "", f"failed: {run['error']}", ""]
    summary, check = run.get("summary", {}), run.get("cpu_check", {})
    lines = [
        f"## Stages, {variant} features (SAM-deform: {run.get('deform')})",
        "",
        f"{summary.get('pairs_ok', 0)} of {summary.get('pairs', 0)} pairs registered; warm-up "
        f"{run.get('warmup_s', '—')} s. Dice against the CPU result of the same pair: largest "
        f"difference {check.get('max_abs_dice_difference', '—')} over {check.get('compared', 0)} "
        f"values (CPU result stored for {check.get('pairs_with_cpu_result', 0)} pairs), "
        f"{'agree' if check.get('agree') else 'DO NOT agree'} within 0.01"
        + (f"; status differs on {check['status_differs']}" if check.get("status_differs") else "")
        + ".",
        "",
    ]
    stage_names = [s for s in STAGE_COLUMNS if s in summary.get("mean_seconds", {})]
    header = "| pair | " + " | ".join(f"{s} s" for s in stage_names) + " | total s | peak MiB |"
    header += " Dice per stage (device / CPU) |"
    lines += [header, "|" + "---|" * (len(stage_names) + 4)]
    for pair in run["pairs"]:
        if pair["status"] != "ok":
            lines.append(f"| {pair['pair']} | {pair['status']}: {pair.get('error', '')[:80]} |")
            continue
        dice = ", ".join(
            f"{s} {v:.3f} / {_number(pair.get('dice_cpu', {}).get(s))}"
            for s, v in pair["dice"].items()
        )
        cells = [_number(pair["seconds"].get(s)) for s in stage_names]
        lines.append(
            f"| {pair['pair']} | {' | '.join(cells)} | {pair['total_s']:.3f} | "
            f"{pair.get('peak_gpu_mb', '—')} | {dice} |"
        )
    if summary.get("pairs_ok"):
        means = summary["mean_seconds"]
        cells = [_number(means.get(s)) for s in stage_names]
        dice = ", ".join(
            f"{s} {v:.3f} / {_number(_mean_cpu_dice(run['pairs'], s))}"
            for s, v in summary["mean_dice"].items()
        )
        lines.append(
            f"| **mean** | {' | '.join(cells)} | {means['total']:.3f} | "
            f"{summary.get('peak_gpu_mb', '—')} | {dice} |"
        )
    return lines + [""]


def _mean_cpu_dice(pairs: list[dict], stage: str) -> float | None:
    """The CPU result's mean Dice over the pairs the device registered (same pairs, same mean)."""
    values = [p["dice_cpu"][stage] for p in pairs if stage in p.get("dice_cpu", {})]
    return sum(values) / len(values) if values else None
