"""Pack the GPU kit's data on the CPU side (needs SimpleITK and ../shared/data).

    python benchmarks/device/pack.py                 # 10 pairs + the SAM training volumes
    python benchmarks/device/pack.py --parts pairs   # only the pairs and their CPU results
    python benchmarks/device/pack.py --parts maps --pair-maps CACHE  # add cross-patient maps

Writes ``benchmarks/device/data/`` (git-ignored; the device call carries it), in the layout that
``packed.py`` describes: seeded OpenKBP validation pairs on the 2 mm working grid with their labels,
the CPU result of every pair and variant (Dice per stage, computed here on the packed arrays
themselves, so that the device run is compared on identical inputs), and the SAM training volumes
(OpenKBP training CTs and POPI on their own grids), and with ``--pair-maps`` the registration maps of a
``same-register sam-pair-maps`` cache between packed training volumes, each downsampled to a coarse
grid (``--map-spacing``, 8 mm), for ``train_sam_gpu.py --variant cross``. The pairs are ``run_pairs.py``'s seeded pairing
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

from SAMERegistrationLib.errors import InputError  # noqa: E402
from SAMERegistrationLib.grid import Grid  # noqa: E402
from SAMERegistrationLib.image import check_ct, read_image, resample_array, to_working_grid  # noqa: E402
from SAMERegistrationLib.train.crops import scan_from_image  # noqa: E402
from SAMERegistrationLib.train.pair_maps import (  # noqa: E402
    PairMap,
    load_pair_maps,
    read_map,
    sample_on_grid,
)

DEFAULT_DATA = KIT / "data"
TRAVEL_LIMIT_MB = 64.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="output folder")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--parts", default="pairs,train", help="pairs, train, maps (comma-separated)"
    )
    parser.add_argument("--pairs", type=int, default=10, help="validation pairs (10)")
    parser.add_argument("--patients", type=int, default=6, help="validation patients (6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spacing", type=float, default=2.0, help="working grid, mm (2)")
    parser.add_argument(
        "--train-limit", type=int, default=None, help="pack only the first N training CTs"
    )
    parser.add_argument(
        "--pair-maps",
        type=Path,
        default=None,
        help="a sam-pair-maps cache of training pairs: pack its maps (adds the maps part)",
    )
    parser.add_argument(
        "--map-spacing", type=float, default=8.0, help="grid of the packed maps, mm (8)"
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="two small phantoms instead of real CT (for the tiny mode's test; no shared data)",
    )
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if args.pair_maps is not None:
        args.parts.add("maps")
    if not args.parts <= {"pairs", "train", "maps"}:
        parser.error("--parts takes pairs, train and maps, comma-separated")
    if "maps" in args.parts and args.pair_maps is None:
        parser.error("the maps part needs --pair-maps CACHE (a sam-pair-maps folder)")
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


def training_paths(shared: Path, limit: int | None = None) -> list[Path]:
    """The SAM training CTs: OpenKBP's training patients (the first ``limit``) and POPI."""
    paths = sorted((shared / "openkbp").glob("train_pt_*_ct.nii.gz"))[:limit]
    return [*paths, shared / "popi" / "popi_phase00_ct_2mm.nii.gz"]


def volume_name(path: Path) -> str:
    return path.name.removesuffix(".nii.gz")


def pack_training(args: argparse.Namespace) -> None:
    paths = training_paths(args.shared, args.train_limit)
    volumes = []
    for path in paths:
        name = volume_name(path)
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


def pack_pair_maps(args: argparse.Namespace) -> None:
    """The cache's maps between packed training volumes, coarse, into ``maps/`` (replaced whole).

    The library checks the cache first (``load_pair_maps``): a cache whose manifest lists scans
    other than the kit's training CTs (validation patients, other files, changed contents) is
    refused by name before anything is written."""
    packed_names = {volume.name for volume in packed.read_training(args.data)}
    candidates = training_paths(args.shared)
    names = {str(path.resolve()): volume_name(path) for path in candidates}
    try:
        usable = load_pair_maps(args.pair_maps, candidates)
    except InputError as err:
        sys.exit(f"error: {err}")
    maps, errors, skipped = [], [], 0
    for path in usable:
        pair_map = read_map(path)
        fixed, moving = names[pair_map.fixed.path], names[pair_map.moving.path]
        if fixed not in packed_names or moving not in packed_names:
            skipped += 1  # a scan left out by --train-limit
            continue
        coarse, error = downsample_map(pair_map, fixed, moving, args.map_spacing)
        maps.append(coarse)
        errors.append(error)
    if not maps:
        sys.exit(f"error: no map of {args.pair_maps} joins two packed training volumes")
    folder = args.data / packed.MAPS_DIR
    for stale in folder.glob("*.npz"):
        stale.unlink()
    for coarse in maps:
        packed.write_pair_map(args.data, coarse)
    error = np.concatenate(errors)
    print(
        f"packed {len(maps)} pair maps on a {args.map_spacing:g} mm grid "
        f"({packed.folder_size_mb(folder):.1f} MiB; {skipped} skipped: scans not packed); "
        f"the coarse map departs from the full one by {np.median(error):.2f} mm median, "
        f"{np.percentile(error, 95):.2f} mm p95, {error.max():.2f} mm at most",
        flush=True,
    )


def downsample_map(
    pair_map: PairMap, fixed: str, moving: str, spacing_mm: float, samples: int = 20000
) -> tuple[packed.PackedMap, np.ndarray]:
    """The map on an identity-direction grid of ``spacing_mm`` over its working grid, and the
    distance (mm) between the coarse and the full map at ``samples`` random points of that grid."""
    grid = pair_map.grid
    half = 0.5 * np.abs(np.asarray(grid.spacing))  # the library's maps reach half a voxel out
    corners = grid.corners()
    lo, hi = corners.min(axis=0) - half, corners.max(axis=0) + half
    size = np.ceil((hi - lo) / spacing_mm).astype(int) + 1  # (x, y, z), covers [lo, hi]
    origin = (lo + hi) / 2 - (size - 1) * spacing_mm / 2
    coarse = Grid(tuple(int(n) for n in size[::-1]), (spacing_mm,) * 3, tuple(origin), np.eye(3))
    points = coarse.voxel_centres().reshape(-1, 3)
    field = sample_on_grid(pair_map.dense.astype(np.float32), grid, points)
    similarity = sample_on_grid(pair_map.similarity[None].astype(np.float32), grid, points)[0]
    result = packed.PackedMap(
        fixed=fixed,
        moving=moving,
        affine=pair_map.affine,
        field=field.reshape(3, *coarse.shape).astype(np.float16),
        field_origin=origin,
        field_spacing=np.full(3, spacing_mm),
        valid_lo_mm=lo,
        valid_hi_mm=hi,
        confidence=np.round(np.clip(similarity, 0, 1) * 255).astype(np.uint8).reshape(coarse.shape),
    )
    rng = np.random.default_rng(0)
    probe = rng.uniform(lo, hi, size=(samples, 3))
    u = sample_on_grid(result.field.astype(np.float32), coarse, probe).T
    moved = (probe + u) @ pair_map.affine[:3, :3].T + pair_map.affine[:3, 3]
    return result, np.linalg.norm(moved - pair_map.map_points(probe), axis=1)


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
    if "maps" in args.parts:
        try:
            pack_pair_maps(args)
        except FileNotFoundError as err:
            sys.exit(f"error: {err}")
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
