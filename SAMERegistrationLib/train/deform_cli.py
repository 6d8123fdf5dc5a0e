"""``same-register train-deform``: SAM-deform training from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import FEATURES, parse_set_options
from ..errors import SameRegistrationError
from .command import Bars, add_run_arguments, report_interrupted
from .deform_trainer import DeformTrainConfig, train_deform
from .sam_trainer import collect_scans

_DEFAULTS = DeformTrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="same-register train-deform",
        description="Train the SAM-deform network on pairs of CT scans, each pre-aligned by the "
        "affine and coarse stages (cached in OUTPUT/cache). Do not train on scans you evaluate on: "
        "for OpenKBP, leave validation_* and the label maps out, e.g. with --exclude-pattern "
        "'validation_*' --exclude-pattern '*_label*'.",
    )
    parser.add_argument(
        "scans",
        nargs="+",
        help="CT volumes in Hounsfield units, or folders holding only such files (their "
        "sub-folders and hidden files are ignored)",
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--exclude-pattern",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out files whose name or path matches this shell pattern (repeatable)",
    )
    parser.add_argument("--epochs", type=int, default=_DEFAULTS.epochs, help="default %(default)s")
    parser.add_argument(
        "--pairs",
        type=int,
        default=_DEFAULTS.pairs,
        help="ordered (fixed, moving) pairs drawn from the scans (default %(default)s)",
    )
    parser.add_argument(
        "--features",
        choices=FEATURES,
        default=_DEFAULTS.features,
        help="embeddings for the pre-alignment, the correlation input and the SAM loss "
        "(default: auto, SAM when weights exist, else MIND)",
    )
    parser.add_argument("--weights", help="SAM checkpoint (default: the one shipped, if any)")
    parser.add_argument(
        "--spacing",
        type=float,
        default=_DEFAULTS.working_spacing_mm,
        help="working grid spacing in mm (default %(default)s); register with the same",
    )
    parser.add_argument(
        "--variant",
        choices=["svf", "dvf"],
        default=_DEFAULTS.variant,
        help="svf: velocity integrated by scaling and squaring (default); dvf: direct displacement",
    )
    parser.add_argument(
        "--no-correlation",
        action="store_true",
        help="leave out the SAM correlation input (ablation)",
    )
    parser.add_argument(
        "--similarity", choices=["lncc", "ncc"], default=_DEFAULTS.similarity, help="default lncc"
    )
    parser.add_argument(
        "--window", type=int, default=_DEFAULTS.window, help="local NCC window (default 21)"
    )
    parser.add_argument(
        "--similarity-weight", type=float, default=_DEFAULTS.similarity_weight, metavar="W"
    )
    parser.add_argument(
        "--sam-loss-weight",
        type=float,
        default=_DEFAULTS.sam_loss_weight,
        metavar="W",
        help="weight of the SAM loss, 0 to leave it out (default %(default)s)",
    )
    parser.add_argument(
        "--smoothness", type=float, default=_DEFAULTS.smoothness, metavar="W", help="default 0.2"
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="train on a random box of this many working voxels per iteration (default: the "
        "whole fixed grid); saves memory and time, e.g. on a CPU",
    )
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="default %(default)s")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="registration setting for the pre-alignment, e.g. --set coarse.iterations=200",
    )
    add_run_arguments(parser, _DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``train-deform``; 0 on success, 2 on a user error (printed as ``error: ...``)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bars = Bars() if args.progress == "bars" else None
    try:
        config = DeformTrainConfig(
            epochs=args.epochs,
            pairs=args.pairs,
            features=args.features,
            sam_weights=args.weights,
            working_spacing_mm=args.spacing,
            variant=args.variant,
            correlation=not args.no_correlation,
            similarity=args.similarity,
            window=args.window,
            similarity_weight=args.similarity_weight,
            sam_loss_weight=args.sam_loss_weight,
            smoothness=args.smoothness,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            checkpoint_every=args.checkpoint_every,
            patch=tuple(args.patch) if args.patch else None,
            prealign=parse_set_options(args.set),
        )
        scans = collect_scans(args.scans, args.exclude_pattern)
        final = train_deform(
            scans,
            args.output,
            config,
            progress=(lambda d, t, loss: bars.update("train-deform", d, t, loss)) if bars else None,
            resume=args.resume,
            prepare_progress=(lambda d, t: bars.update("pre-align", d, t)) if bars else None,
        )
    except SameRegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return report_interrupted(args.output)
    finally:
        if bars is not None:
            bars.close()
    print(f"trained SAM-deform weights: {final}")
    return 0
