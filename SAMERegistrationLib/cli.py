"""The ``same-register`` command line.

same-register FIXED MOVING -o OUT [options]   register two CT scans
same-register demo -o OUT                      register a synthetic pair with a known answer
same-register train-sam SCANS -o OUT           train the SAM network (self-supervised)
same-register train-deform SCANS -o OUT        train the SAM-deform network on pairs of scans
same-register sam-pair-maps SCANS -o CACHE     register training pairs for cross-patient train-sam
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from .config import (
    DEVICES,
    FEATURES,
    SPACING_RANGE_MM,
    STAGES,
    RegistrationConfig,
    parse_set_options,
)
from .errors import SameRegistrationError

log = logging.getLogger("SAMERegistrationLib")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-sam":
        from .train.sam_cli import main as train_sam_main

        return train_sam_main(argv[1:])
    if argv and argv[0] == "sam-pair-maps":
        from .train.pair_maps_cli import main as pair_maps_main

        return pair_maps_main(argv[1:])
    if argv and argv[0] == "train-deform":
        from .train.deform_cli import main as train_deform_main

        return train_deform_main(argv[1:])
    if argv and argv[0] == "demo":
        parser = _demo_parser()
        args = parser.parse_args(argv[1:])
        action = _run_demo
    else:
        parser = _register_parser()
        args = parser.parse_args(argv)
        action = _run_register
    from .progress_display import TqdmLogHandler

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[TqdmLogHandler()],
    )
    try:
        return action(args)
    except SameRegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM while the output folder is claimed
        print("interrupted: nothing was written.", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument("--features", choices=FEATURES, help="embeddings (default: auto)")
    parser.add_argument("--weights", help="SAM checkpoint (official SAM.pth or our own)")
    parser.add_argument("--deform-weights", help="SAM-deform network weights (from train-deform)")
    parser.add_argument(
        "--stages",
        help=f"comma-separated stages to run, from {','.join(STAGES)} (default: all)",
    )
    parser.add_argument("--device", help=f"{', '.join(DEVICES)} or cuda:N (default auto)")
    low, high = SPACING_RANGE_MM
    parser.add_argument(
        "--spacing", type=float, help=f"working grid spacing in mm, {low:g} to {high:g} (default 2)"
    )
    parser.add_argument("--config", type=Path, help="JSON configuration file (see report.json)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one configuration value, e.g. --set coarse.iterations=200 (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--save-feature-maps",
        action="store_true",
        help="also write both images' descriptors (feature_maps.npz) for a later match search",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    parser.add_argument(
        "--progress",
        choices=["bars", "json", "none"],
        default="bars",
        help="progress display: bars (default), json (one JSON object per line on standard "
        "output, for programs driving the command) or none",
    )


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="same-register",
        description="Register a moving CT to a fixed CT with SAME++ (affine, coarse, deform, "
        "instance optimisation). Also: 'same-register demo -o OUT'.",
    )
    parser.add_argument("fixed", help="fixed image: a file SimpleITK reads or a DICOM folder")
    parser.add_argument("moving", help="moving image: a file SimpleITK reads or a DICOM folder")
    parser.add_argument("--fixed-labels", help="label map of the fixed image (for Dice)")
    parser.add_argument("--moving-labels", help="label map of the moving image (warped too)")
    _common_options(parser)
    return parser


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="same-register demo",
        description="Generate a synthetic CT-like pair with a known deformation and register it.",
    )
    _common_options(parser)
    return parser


def build_config(args: argparse.Namespace) -> RegistrationConfig:
    config = RegistrationConfig.from_json(args.config) if args.config else RegistrationConfig()
    overrides: dict = {}
    for flag, key in (
        ("features", "features"),
        ("weights", "sam_weights"),
        ("deform_weights", "deform.weights"),
        ("device", "device"),
        ("spacing", "working_spacing_mm"),
        ("seed", "seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    if args.stages:
        chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = sorted(set(chosen) - set(STAGES))
        if unknown:
            raise SameRegistrationError(
                f"Unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}."
            )
        for stage in STAGES:
            overrides[f"{stage}.enabled"] = stage in chosen
    overrides.update(parse_set_options(args.set))
    return config.with_overrides(overrides) if overrides else config


def _json_progress(stage: str, done: int, total: int) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)


def _run_register(args: argparse.Namespace) -> int:
    _register_and_write(args)
    return 0


def _register_and_write(args: argparse.Namespace, inputs: dict | None = None):
    from .export import output_names
    from .output_folder import claim_output_folder

    config = build_config(args)
    names = output_names(config.export)
    if not args.moving_labels:
        names.pop("warped_labels")
    with claim_output_folder(args.output, list(names.values()), args.overwrite):
        return _register_and_write_claimed(args, config, inputs)


def _register_and_write_claimed(args: argparse.Namespace, config, inputs: dict | None):
    from .export import write_outputs
    from .image import check_ct, read_image
    from .pipeline import register
    from .progress_display import StageProgress

    if args.progress == "json":
        bars = _json_progress
    else:
        bars = StageProgress(args.progress == "bars" and not args.quiet)
    started = time.perf_counter()
    try:
        result = register(
            args.fixed, args.moving, config, args.fixed_labels, args.moving_labels, progress=bars
        )
    finally:
        if isinstance(bars, StageProgress):
            bars.close()
    moving = check_ct(read_image(args.moving, "moving image"), "moving image")
    labels = read_image(args.moving_labels, "moving label map") if args.moving_labels else None
    inputs = inputs or {
        "fixed": args.fixed,
        "moving": args.moving,
        "fixed_labels": args.fixed_labels,
        "moving_labels": args.moving_labels,
    }
    paths = write_outputs(
        result, args.output, moving, labels, inputs, args.overwrite, args.save_feature_maps
    )
    if args.progress == "json":
        print(json.dumps({"finished": True, "report": str(paths["report"])}), flush=True)
    else:
        _print_summary(result, paths, time.perf_counter() - started)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result


def _print_summary(result, paths: dict, seconds: float) -> None:
    metrics = result.metrics
    lines = [f"registered with {result.features} features on {result.device} in {seconds:.1f} s"]
    for stage, info in result.stages.items():
        if info.get("status") == "skipped":
            lines.append(f"  {stage}: skipped ({info['reason']})")
        elif info.get("status") == "rejected":
            lines.append(f"  {stage}: not kept ({info['reason']})")
    lines.append(f"  correspondences kept: {len(result.matches)}")
    folding = f"  folding: {metrics['folding_percent']:.3f} % of the fixed body"
    unfold = result.stages.get("finish", {}).get("unfold")
    if unfold:
        folding += f" ({unfold['folding_before']:.3f} % before {unfold['passes']} unfolding passes)"
    lines.append(folding)
    if "mean_dice_after" in metrics:
        lines.append(
            f"  mean Dice: {metrics['mean_dice_before']:.3f} before, "
            f"{metrics['mean_dice_after']:.3f} after"
        )
    lines.append(f"  outputs in {Path(paths['report']).parent}")
    print("\n".join(lines))


def _run_demo(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .evaluate import target_registration_error
    from .output_folder import claim_output_folder
    from .synthetic import demo_pair

    images = ("fixed", "moving", "fixed_labels", "moving_labels")
    files = [f"{name}.nii.gz" for name in images]
    with claim_output_folder(args.output, files, args.overwrite) as claim:
        pair = demo_pair(seed=args.seed or 0)
        for name, file in zip(images, files):
            sitk.WriteImage(getattr(pair, name), str(claim.staging / file))
        for name, file in zip(images, files):
            setattr(args, name, str(claim.staging / file))
        inputs = {name: str(Path(args.output) / file) for name, file in zip(images, files)}
        result = _register_and_write(args, inputs)
        claim.commit(files)
    # The demo knows the true map: report the error at points spread over the fixed body.
    body = np.argwhere(sitk.GetArrayFromImage(pair.fixed) > -500)[::97][:, ::-1]
    points = [pair.fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in body]
    truth = pair.true_map(np.array(points))
    found = result.map_points(np.array(points))
    start = np.linalg.norm(truth - np.array(points), axis=1)
    error = target_registration_error(found, truth)
    print(
        f"  known deformation: mean {start.mean():.1f} mm before, end-point error "
        f"{error.mean():.2f} mm after"
    )
    return 0
