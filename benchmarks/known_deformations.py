"""The default pipeline beyond head & neck: abdominal and thoracic CT under large known deformations.

Each case is a real scan from ``../shared/data`` (not OpenKBP) and a seeded deformation: an affine
(rotation up to 10 degrees, scaling up to 10 %, translation up to 20 mm, about the scan's centre)
composed with a smooth random warp (largest vector ``--warp-mm``, 15 mm by default). The moving
image is the scan; the fixed image is the scan pulled through the known map, so the true
fixed -> moving map is known everywhere and the score is the end-point error (EPE, mm) at 2000
seeded points of the fixed body (> -300 HU, away from the border).

Every case is registered four times, with MIND features and every other setting at its default:
affine alone, affine + coarse, affine + coarse + instance (deform stage off), and the default
(affine + coarse + deform + instance). The last two rows show whether the shipped deform network,
trained on head & neck, helps on other body regions; the report's stage status says whether the
pipeline kept its field. Each run is a fresh child process: seconds and peak RSS are its own.

    python benchmarks/known_deformations.py                  # every case, 2 seeds
    python benchmarks/known_deformations.py --cases abdomen --seeds 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    REPO,
    machine_info,
    machine_line,
    markdown_table,
    mean_text,
    peak_rss_kb,
    run_as_worker,
    run_child,
    write_json,
)

CASES = {
    "abdomen": "totalseg/example_ct.nii.gz",  # 122x101x112 @ 3 mm, LPS direction flipped in x
    "thorax": "popi/popi_phase00_ct_2mm.nii.gz",  # 250x250x141 @ 2 mm, whole chest
    "chest_crop": "totalseg/aorta_ct_cropped.nii.gz",  # 120x126x164 @ 1.5 mm, partial chest
}
RUNS = {
    "affine": {"coarse__enabled": False, "deform__enabled": False, "instance__enabled": False},
    "+coarse": {"deform__enabled": False, "instance__enabled": False},
    "+coarse+instance (no deform)": {"deform__enabled": False},
    "default (+deform)": {},
}
POINTS = 2000


def deformation(image, seed: int, warp_mm: float):
    """The seeded known fixed -> moving map: an affine about the centre after a smooth warp."""
    import numpy as np
    import SimpleITK as sitk

    from SAMERegistrationLib.grid import Grid
    from SAMERegistrationLib.synthetic import affine_about_centre, smooth_displacement

    rng = np.random.default_rng(seed)
    affine = affine_about_centre(
        image,
        rotation_deg=tuple(rng.uniform(-10, 10, 3)),
        scale=tuple(rng.uniform(0.9, 1.1, 3)),
        translation_mm=tuple(rng.uniform(-20, 20, 3)),
    )
    warp = smooth_displacement(
        Grid.from_sitk(image), magnitude_mm=warp_mm, seed=seed + 100, smoothness_mm=50.0
    )
    return sitk.CompositeTransform([affine, warp])  # applied right to left: the warp first


def body_points(image, count: int, seed: int):
    """Physical points of the body (> -300 HU), at least 4 voxels from the border."""
    import numpy as np
    import SimpleITK as sitk

    from SAMERegistrationLib.grid import Grid

    array = sitk.GetArrayFromImage(image)
    inner = np.zeros(array.shape, dtype=bool)
    inner[4:-4, 4:-4, 4:-4] = True
    zyx = np.argwhere((array > -300) & inner)
    chosen = zyx[np.random.default_rng(seed).choice(len(zyx), min(count, len(zyx)), False)]
    return Grid.from_sitk(image).index_to_physical(chosen[:, ::-1].astype(float))


def work(job: dict, out: dict) -> None:
    """One registration of one case (worker mode): EPE, folding, stage status, time."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from SAMERegistrationLib import register
    from SAMERegistrationLib.synthetic import known_pair

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    scan = sitk.ReadImage(job["path"])
    pair = known_pair(scan, deformation(scan, job["seed"], job["warp_mm"]))
    points = body_points(pair.fixed, POINTS, job["seed"])
    truth = pair.true_map(points)
    start = time.perf_counter()
    result = register(pair.fixed, pair.moving, features="mind", seed=0, **RUNS[job["run"]])
    out["seconds"] = time.perf_counter() - start
    error = np.linalg.norm(result.map_points(points) - truth, axis=1)
    out["start_epe"] = float(np.linalg.norm(truth - points, axis=1).mean())
    out["epe"] = float(error.mean())
    out["epe_95"] = float(np.percentile(error, 95))
    out["folding_percent"] = result.metrics.get("folding_percent")
    out["stages"] = {
        name: stage.get("status") for name, stage in result.stages.items() if "status" in stage
    }
    out["warnings"] = list(result.warnings)
    out["peak_gb"] = peak_rss_kb() / 1024**2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    parser.add_argument("--seeds", type=int, default=2, help="deformations per case (2)")
    parser.add_argument("--warp-mm", type=float, default=15.0, help="largest warp vector (15 mm)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, help="threads for each run (default: torch's)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run (1800)")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(*args.worker, work)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"error: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    missing = [str(args.data / CASES[c]) for c in cases if not (args.data / CASES[c]).exists()]
    if missing:
        sys.exit(f"error: missing scan(s): {', '.join(missing)}; pass --data to the shared data")
    machine = machine_info()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="known-deformations-"))
    for case in cases:
        for seed in range(args.seeds):
            for run in RUNS:
                job = {
                    "path": str(args.data / CASES[case]),
                    "seed": seed,
                    "warp_mm": args.warp_mm,
                    "run": run,
                    "threads": args.threads,
                }
                out, _ = run_child(Path(__file__), job, scratch, args.timeout)
                row = {"case": case, "seed": seed, "run": run, **out}
                rows.append(row)
                if out["status"] != "ok":
                    print(f"{case} seed {seed} {run:30s} FAILED: {out['error']}", flush=True)
                    continue
                kept = ", ".join(f"{k} {v}" for k, v in row["stages"].items())
                print(
                    f"{case} seed {seed} {run:30s} EPE {row['epe']:5.2f} mm (start "
                    f"{row['start_epe']:5.2f}, 95th {row['epe_95']:5.2f})  fold "
                    f"{row['folding_percent'] or 0:.3f}%  {row['seconds']:5.1f} s  "
                    f"{row['peak_gb']:.2f} GB  [{kept}]",
                    flush=True,
                )
    print()
    print(machine_line(machine, "cpu", ["cpu"]))
    table = []
    for case in cases:
        for run in RUNS:
            done = [r for r in rows if r["case"] == case and r["run"] == run and "epe" in r]
            table.append(
                [
                    case,
                    run,
                    mean_text((r["start_epe"] for r in done), 2),
                    mean_text((r["epe"] for r in done), 2),
                    mean_text((r["epe_95"] for r in done), 2),
                    mean_text((r["folding_percent"] for r in done), 3),
                    mean_text((r["seconds"] for r in done), 1),
                    f"{len(done)}/{args.seeds}",
                ]
            )
    head = ["case", "stages", "EPE before", "EPE", "EPE 95th", "folding %", "s", "runs"]
    print(markdown_table(head, table))
    if args.json:
        write_json(args.json, {"machine": machine, "warp_mm": args.warp_mm, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
