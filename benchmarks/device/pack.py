"""Pack the GPU kit's data on the CPU side (needs SimpleITK and ../shared/data).

    python benchmarks/device/pack.py                 # 10 pairs + the SAM training volumes
    python benchmarks/device/pack.py --parts pairs   # only the pairs and their CPU results

Writes ``benchmarks/device/data/`` (git-ignored; the device call carries it), in the layout that
``packed.py`` describes: seeded OpenKBP validation pairs on the 2 mm working grid with their labels,
the CPU result of every pair and variant (Dice per stage, computed here on the packed arrays
themselves, so that the device run is compared on identical inputs), and the SAM training volumes
(OpenKBP training CTs and POPI on their own grids). The pairs are ``run_pairs.py``'s seeded pairing
restricted to a seeded subset of patients, so that few images serve many pairs. Prints the folder's
size and what would travel with the working tree.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

KIT = Path(__file__).resolve().parent
REPO = KIT.parent.parent
for path in (str(REPO), str(KIT), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import packed  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from run_pairs import draw_pairs, validation_patients  # noqa: E402

from SAMERegistrationLib.image import check_ct, read_image, resample_array, to_working_grid  # noqa: E402
from SAMERegistrationLib.train.crops import scan_from_image  # noqa: E402

DEFAULT_DATA = KIT / "data"
TRAVEL_LIMIT_MB = 64.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="output folder")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--parts", default="pairs,train", help="pairs, train or both")
    parser.add_argument("--pairs", type=int, default=10, help="validation pairs (10)")
    parser.add_argument("--patients", type=int, default=6, help="validation patients (6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=2.0, help="working grid, mm (2)")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="pack only the first N training CTs"
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="two small phantoms instead of real CT (for the tiny mode's test; no shared data)",
    )
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"pairs", "train"}:
        parser.error("--parts takes pairs, train or pairs,train")
    return args


def pack_pairs(args: argparse.Namespace) -> None:
    openkbp = args.shared / "openkbp"
    patients = validation_patients(openkbp)
    chosen = sorted(random.Random(args.seed).sample(patients, min(args.patients, len(patients))))
    pairs = draw_pairs(chosen, args.pairs, args.seed)
    used = sorted({name for pair in pairs for name in pair})
    for name in used:
        if (args.data / packed.IMAGES_DIR / f"{name}.npz").is_file():
            continue  # packed by an earlier, stopped run
        image = check_ct(read_image(openkbp / f"{name}_ct.nii.gz", "CT"), name)
        work = to_working_grid(image, args.spacing)
        labels = sitk.ReadImage(str(openkbp / f"{name}_label.nii.gz"))
        on_grid = resample_array(labels, work.grid, sitk.sitkNearestNeighbor, 0)
        grid = work.grid
        packed.write_image(
            args.data, name, work.hu, work.body, on_grid, grid.spacing, grid.origin, grid.direction
        )
        print(f"packed {name}: working grid {grid.describe()}", flush=True)
    document = {
        "spacing_mm": args.spacing,
        "seed": args.seed,
        "patients": chosen,
        "pairs": [{"fixed": f, "moving": m} for f, m in pairs],
        "cpu": {},
    }
    earlier = {}
    if (args.data / packed.PAIRS_FILE).is_file():  # continue a stopped run on the same pairing
        before = packed.read_pairs(args.data)
        if {k: before.get(k) for k in ("spacing_mm", "seed", "patients")} == {
            k: document[k] for k in ("spacing_mm", "seed", "patients")
        }:
            earlier = before.get("cpu", {})
    document["cpu"] = dict(earlier)
    packed.write_pairs(args.data, document)  # usable at once; the CPU results are added per pair
    cpu_reference(args.data, document, earlier)


def cpu_reference(folder: Path, document: dict, earlier: dict) -> None:
    """Run every variant on every pair on the CPU and store the results in ``pairs.json``."""
    import bench
    import stages

    device = torch.device("cpu")
    for variant in stages.VARIANTS:
        tick = time.perf_counter()
        print(f"CPU reference, {variant}:", flush=True)

        def save(run: dict, variant: str = variant, tick: float = tick) -> None:
            run["machine"] = f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
            run["seconds"] = round(time.perf_counter() - tick, 1)
            document["cpu"][variant] = run
            packed.write_pairs(folder, document)  # after each pair: a stop keeps what is done

        save(
            bench.run_variant(
                folder,
                document["pairs"],
                variant,
                device,
                warmup=False,
                previous=earlier.get(variant),
                save=save,
            )
        )


def pack_synthetic(args: argparse.Namespace) -> None:
    """Two small phantoms, the second shifted, as the pairs (both ways) and the training set."""
    from SAMERegistrationLib.synthetic import make_phantom

    names, volumes = [], []
    for seed, origin in ((0, (0.0, 0.0, 0.0)), (1, (9.0, -6.0, 4.0))):
        image, labels = make_phantom(size_xyz=(36, 32, 24), spacing=3.0, seed=seed)
        image.SetOrigin(origin)
        labels.SetOrigin(origin)
        name = f"phantom_{seed}"
        work = to_working_grid(check_ct(image, name), args.spacing)
        on_grid = resample_array(labels, work.grid, sitk.sitkNearestNeighbor, 0)
        grid = work.grid
        packed.write_image(
            args.data, name, work.hu, work.body, on_grid, grid.spacing, grid.origin, grid.direction
        )
        scan = scan_from_image(image, name)
        volumes.append(
            packed.TrainVolume(
                name,
                packed.hu_to_u8(
                    sitk.GetArrayViewFromImage(scan.image),
                    sitk.GetArrayViewFromImage(scan.body).astype(bool),
                ),
                np.array(image.GetSpacing()),
                np.array(image.GetOrigin()),
                scan.box_lo_mm,
                scan.box_hi_mm,
            )
        )
        names.append(name)
    packed.write_training(args.data, volumes)
    pairs = [{"fixed": names[0], "moving": names[1]}, {"fixed": names[1], "moving": names[0]}]
    document = {"spacing_mm": args.spacing, "seed": args.seed, "patients": names, "pairs": pairs}
    cpu_reference(args.data, {**document, "cpu": {}}, {})


def pack_training(args: argparse.Namespace) -> None:
    openkbp = args.shared / "openkbp"
    paths = sorted(openkbp.glob("train_pt_*_ct.nii.gz"))[: args.train_limit]
    paths.append(args.shared / "popi" / "popi_phase00_ct_2mm.nii.gz")
    volumes = []
    for path in paths:
        name = path.name.removesuffix(".nii.gz")
        image = read_image(path, "training CT")
        if not np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3), atol=1e-6):
            sys.exit(f"error: {path} is not axis-aligned; the GPU crops assume identity direction")
        scan = scan_from_image(image, name)
        hu = sitk.GetArrayViewFromImage(scan.image)
        body = sitk.GetArrayViewFromImage(scan.body).astype(bool)
        volumes.append(
            packed.TrainVolume(
                name=name,
                values=packed.hu_to_u8(hu, body),
                spacing=np.array(image.GetSpacing()),
                origin=np.array(image.GetOrigin()),
                box_lo_mm=scan.box_lo_mm,
                box_hi_mm=scan.box_hi_mm,
            )
        )
        if len(volumes) % 20 == 0:
            print(f"read {len(volumes)} of {len(paths)} training volumes", flush=True)
    packed.write_training(args.data, volumes)
    print(f"packed {len(volumes)} training volumes", flush=True)


def travelling_tree_mb() -> float:
    """Tracked and untracked-not-ignored files of the working tree, MiB."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [REPO / name.decode() for name in listed if name]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        pack_synthetic(args)
        return 0
    if "train" in args.parts:
        pack_training(args)
    if "pairs" in args.parts:
        pack_pairs(args)
    data_mb = packed.folder_size_mb(args.data)
    tree_mb = travelling_tree_mb()
    total = data_mb + tree_mb
    print(
        json.dumps(
            {
                "data_folder": str(args.data),
                "data_mib": round(data_mb, 1),
                "tree_mib": round(tree_mb, 1),
                "travels_mib": round(total, 1),
            }
        )
    )
    if total > TRAVEL_LIMIT_MB:
        print(f"error: {total:.1f} MiB would travel, over the {TRAVEL_LIMIT_MB:g} MiB limit")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
