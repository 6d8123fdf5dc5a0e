"""Time and peak memory of the default pipeline, stage by stage, on OpenKBP pairs and a large scan.

Every case runs in a fresh child process (this script in worker mode): ``register()`` with MIND
features and every other setting at its default, then ``write_outputs`` into a temporary folder,
as ``same-register`` does. The child prints nothing; the parent prints per-stage seconds and peak
RSS, the total, and the export's time and size.

Per-stage peak RSS: the child reads the kernel's high-water mark of its resident set
(``VmHWM`` in ``/proc/self/status``) whenever the pipeline's progress callback says a stage ended,
and resets it (``/proc/self/clear_refs``, value 5), so each figure is the peak inside that stage
alone (Linux only; elsewhere every stage shows the process's peak so far, ``ru_maxrss``). The
run's peak is the largest of them, PyTorch and the library's imports included (about 0.3 GB).

Cases: ``--pairs N`` seeded OpenKBP validation pairs (the pairing of ``run_pairs.py``), with their
label maps; and with ``--large`` (the default) one scan of 512x512x400 voxels made on the fly in a
temporary folder: the fixed CT of the first pair resampled onto that many voxels over the same
extent, registered against a copy of itself shifted by a few millimetres (labels likewise).
Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    case_files,
    draw_pairs,
    find_openkbp,
    machine_info,
    machine_line,
    markdown_table,
    median_or_none,
    parse_overrides,
    peak_rss_kb,
    register_case,
    run_as_worker,
    run_child,
    validation_patients,
)

LARGE_SIZE_XYZ = (512, 512, 400)
LARGE_SHIFT_MM = (3.0, -2.0, 4.0)  # the moving copy's content moves by this much (LPS mm)
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class StageMeter:
    """Seconds and peak RSS of each stage, read from the pipeline's progress callback.

    A stage's segment runs from the end of the previous stage to its own end, so the work between
    two stages (e.g. the final warp and Dice before "finish") counts for the stage that follows.
    """

    def __init__(self) -> None:
        self.segments: list[dict] = []
        self.started = False
        self.per_stage = self._reset_peak()
        self.clock = time.perf_counter()

    def progress(self, stage: str, done: int, total: int) -> None:
        if not self.started:  # all before the first stage reports
            self.started = True
            self.close("read, checks, initial pose")
        if done == total:
            self.close(stage)

    def close(self, name: str) -> None:
        now = time.perf_counter()
        self.segments.append(
            {"stage": name, "seconds": round(now - self.clock, 3), "peak_kb": self._peak_kb()}
        )
        self._reset_peak()
        self.clock = time.perf_counter()

    def _peak_kb(self) -> int:
        if self.per_stage:
            for line in STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return peak_rss_kb()

    @staticmethod
    def _reset_peak() -> bool:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------------------------
# The child: one case
# --------------------------------------------------------------------------------------------


def run_worker(job_path: str, out_path: str) -> int:
    def work(job: dict, out: dict) -> None:
        meter = StageMeter()
        import torch

        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        from SAMERegistrationLib.export import write_outputs
        from SAMERegistrationLib.image import read_image

        meter.close("import")
        out["per_stage_peak"] = meter.per_stage
        out["torch_threads"] = torch.get_num_threads()
        case = job["case"]
        clock = time.perf_counter()
        result = register_case(case, progress=meter.progress, **job["overrides"])
        out["register_seconds"] = round(time.perf_counter() - clock, 3)
        meter.close("return")  # anything after "finish" up to the return
        with tempfile.TemporaryDirectory(prefix="same-memory-") as folder:
            clock = time.perf_counter()
            moving = read_image(case["moving"], "moving image")
            labels = read_image(case["moving_labels"], "moving label map")
            paths = write_outputs(result, Path(folder) / "out", moving, labels, overwrite=True)
            out["export_seconds"] = round(time.perf_counter() - clock, 3)
            meter.close("export")
            out["export_mb"] = {
                role: round(path.stat().st_size / 2**20, 2) for role, path in paths.items()
            }
        out["segments"] = meter.segments
        out["maxrss_kb"] = max(s["peak_kb"] for s in meter.segments)
        out["working_grid"] = result.stages["prepare"]["working_grid"]["size_xyz"]
        out["statuses"] = {k: v.get("status", "done") for k, v in result.stages.items()}
        out["mean_dice_after"] = result.metrics.get("mean_dice_after")
        out["folding_percent"] = result.metrics.get("folding_percent")

    return run_as_worker(job_path, out_path, work)


# --------------------------------------------------------------------------------------------
# The parent: cases, children, tables
# --------------------------------------------------------------------------------------------


def make_large_case(pair_case: dict, folder: Path) -> dict:
    """The pair's fixed CT on 512x512x400 voxels, and a copy shifted by LARGE_SHIFT_MM."""
    import SimpleITK as sitk

    ct = sitk.ReadImage(pair_case["fixed"])
    labels = sitk.ReadImage(pair_case["fixed_labels"])
    size = [int(n) for n in ct.GetSize()]
    spacing = [s * n / m for s, n, m in zip(ct.GetSpacing(), size, LARGE_SIZE_XYZ)]
    reference = sitk.Image(list(LARGE_SIZE_XYZ), sitk.sitkUInt8)
    reference.SetSpacing(spacing)
    reference.SetOrigin(ct.GetOrigin())
    reference.SetDirection(ct.GetDirection())
    # Resampling pulls: the copy shows at p what the scan shows at p - shift.
    shift = sitk.TranslationTransform(3, [-s for s in LARGE_SHIFT_MM])
    case = {}
    for role, transform in (("fixed", sitk.Transform()), ("moving", shift)):
        image = sitk.Resample(ct, reference, transform, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
        label = sitk.Resample(labels, reference, transform, sitk.sitkNearestNeighbor, 0)
        case[role] = str(folder / f"large_{role}_ct.nii.gz")
        case[f"{role}_labels"] = str(folder / f"large_{role}_label.nii.gz")
        sitk.WriteImage(image, case[role], useCompression=True)
        sitk.WriteImage(label, case[f"{role}_labels"], useCompression=True)
    return case


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="OpenKBP validation pairs (3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing (0)")
    parser.add_argument(
        "--large",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also register one 512x512x400 scan against a shifted copy (default: on)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in every run")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a configuration override for every run (repeatable); features=mind is preset",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (1800)")
    parser.add_argument("--data", type=Path, help="the shared data folder or its openkbp/")
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def stage_table(names: list[str], reports: list[dict]) -> str:
    stages: list[str] = []
    for report in reports:
        for segment in report.get("segments", []):
            if segment["stage"] not in stages:
                stages.append(segment["stage"])
    rows = []
    for stage in stages:
        row = [stage]
        for report in reports:
            found = [s for s in report.get("segments", []) if s["stage"] == stage]
            row.append(
                f"{found[0]['seconds']:.1f} s / {_gb(found[0]['peak_kb'])} GB" if found else "—"
            )
        rows.append(row)
    return markdown_table(["stage (seconds / peak RSS)", *names], rows)


def summary_table(names: list[str], reports: list[dict]) -> str:
    rows = []
    for name, report in zip(names, reports):
        if report["status"] != "ok":
            rows.append([name, report.get("error", report["status"])] + ["—"] * 7)
            continue
        mb = report["export_mb"]
        rows.append(
            [
                name,
                "x".join(map(str, report["working_grid"])),
                f"{report['wall_seconds']:.1f}",
                f"{report['register_seconds']:.1f}",
                f"{report['export_seconds']:.1f}",
                _gb(report["maxrss_kb"]),
                f"{mb['transform']:.1f} / {sum(mb.values()):.1f}",
                _num(report.get("mean_dice_after")),
                ", ".join(f"{k} {v}" for k, v in report["statuses"].items() if v != "done"),
            ]
        )
    head = ["case", "working grid", "wall s", "register s", "export s", "peak RSS GB",
            "export MB (transform / all)", "Dice after", "stages not done"]  # fmt: skip
    return markdown_table(head, rows)


def _gb(kb: int) -> str:
    return f"{kb / 2**20:.2f}"


def _num(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(*args.worker)
    overrides = {"features": "mind", **parse_overrides(args.overrides, sys.exit)}
    openkbp = find_openkbp(args.data)
    pairs = draw_pairs(validation_patients(openkbp), max(args.pairs, 1), args.seed)
    cases = {f"{f} <- {m}": case_files(openkbp, f, m) for f, m in pairs[: args.pairs]}
    machine = machine_info()
    print(machine_line(machine, "cpu", []))
    print(f"overrides: {overrides}; threads: {args.threads or 'torch default'}")
    with tempfile.TemporaryDirectory(prefix="same-memory-bench-") as scratch:
        scratch = Path(scratch)
        if args.large:
            print(f"making the {'x'.join(map(str, LARGE_SIZE_XYZ))} case from {pairs[0][0]} ...")
            cases["512x512x400 <- shifted copy"] = make_large_case(
                case_files(openkbp, *pairs[0]), scratch
            )
        names, reports = [], []
        for name, case in cases.items():
            job = {"case": case, "overrides": overrides, "threads": args.threads}
            report, wall = run_child(Path(__file__), job, scratch, args.timeout)
            report["wall_seconds"] = wall
            print(f"{name}: {report['status']} in {wall:.1f} s (child process)", flush=True)
            names.append(name)
            reports.append(report)
    if any(not r.get("per_stage_peak", True) for r in reports):
        print("note: per-stage peaks unavailable here; each figure is the peak so far")
    print()
    print(summary_table(names, reports))
    print()
    print(stage_table(names, reports))
    pair_seconds = [r.get("register_seconds") for r in reports[: args.pairs]]
    print(f"\nmedian register seconds over the pairs: {median_or_none(pair_seconds)}")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
