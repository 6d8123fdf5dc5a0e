"""``same-register train-deform``: SAM-deform training from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import FEATURES, parse_set_options
from ..deform_net.field import VARIANTS
from . import command
from .deform_losses import SIMILARITIES
from .deform_trainer import DeformTrainConfig, train_deform
from .sam_trainer import collect_scans

_DEFAULTS = DeformTrainConfig()
# Options that set one DeformTrainConfig field each: flag, field, type, choices, help.
_SETTINGS = [
    ("--epochs", "epochs", int, None, "default %(default)s"),
    ("--pairs", "pairs", int, None,
     "ordered (fixed, moving) pairs drawn from the scans (default %(default)s)"),
    ("--features", "features", str, FEATURES,
     "embeddings for the pre-alignment, the correlation input and the SAM loss (default: auto, "
     "as in registration: SAM with given weights or a preferred shipped model, else MIND)"),
    ("--weights", "sam_weights", str, None, "SAM checkpoint (default with --features sam: the one shipped)"),
    ("--spacing", "working_spacing_mm", float, None,
     "working grid spacing in mm (default %(default)s); register with the same"),
    ("--variant", "variant", str, VARIANTS,
     "svf: velocity integrated by scaling and squaring (default); dvf: direct displacement"),
    ("--similarity", "similarity", str, SIMILARITIES, "default lncc"),
    ("--window", "window", int, None, "local NCC window (default 21)"),
    ("--similarity-weight", "similarity_weight", float, None, "default %(default)s"),
    ("--sam-loss-weight", "sam_loss_weight", float, None,
     "weight of the SAM loss, 0 to leave it out (default %(default)s)"),
    ("--smoothness", "smoothness", float, None, "default 0.2"),
    ("--lr", "lr", float, None, "default %(default)s"),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = command.new_parser(
        "train-deform",
        """Train the SAM-deform network on pairs of CT scans, each pre-aligned by the affine and
        coarse stages (cached in OUTPUT/cache). Do not train on scans you evaluate on: for OpenKBP,
        leave validation_* and the label maps out, e.g. with --exclude-pattern 'validation_*'
        --exclude-pattern '*_label*'.""",
    )
    command.add_settings(parser, _SETTINGS, _DEFAULTS)
    parser.add_argument(
        "--no-correlation",
        action="store_true",
        help="leave out the SAM correlation input (ablation)",
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="train on a random box of this many working voxels per iteration (default: the "
        "whole fixed grid); saves memory and time, e.g. on a CPU",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="registration setting for the pre-alignment, e.g. --set coarse.iterations=200",
    )
    command.add_run_arguments(parser, _DEFAULTS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``train-deform``; 0 on success, 2 on a user error (printed as ``error: ...``)."""
    return command.run_command(build_parser(), argv, _train, "trained SAM-deform weights")


def _train(args: argparse.Namespace, bars: command.Bars | None) -> Path:
    config = DeformTrainConfig(
        **command.setting_values(args, _SETTINGS),
        **command.run_settings(args),
        correlation=not args.no_correlation,
        patch=tuple(args.patch) if args.patch else None,
        prealign=parse_set_options(args.set),
    )
    scans = collect_scans(args.scans, args.exclude_pattern)
    return train_deform(
        scans,
        args.output,
        config,
        progress=command.phase(bars, "train-deform"),
        resume=args.resume,
        prepare_progress=command.phase(bars, "pre-align"),
    )
