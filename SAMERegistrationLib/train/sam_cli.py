"""``same-register train-sam``: self-supervised SAM training from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..features.sam_network import load_sam_checkpoint
from . import command
from .crops import CropConfig
from .sam_losses import LossConfig
from .sam_trainer import LR_SCHEDULES, OPTIMIZERS, SAMTrainConfig, collect_scans, train_sam

_DEFAULTS = SAMTrainConfig()
# Options that set one SAMTrainConfig field each ("loss." ones its LossConfig): flag, field,
# type, choices, help.
_SETTINGS = [
    ("--iterations", "iterations", int, None, "default %(default)s"),
    ("--batch", "batch", int, None, """crop pairs per iteration, from different scans
     (default %(default)s)"""),
    ("--optimizer", "optimizer", str, OPTIMIZERS, """sgd (momentum 0.9, as in SAM) or adam,
     which learns faster in short runs (default %(default)s)"""),
    ("--lr", "lr", float, None, "default %(default)s"),
    ("--lr-schedule", "lr_schedule", str, LR_SCHEDULES, """after the warm-up: constant (as in
     SAM) or a cosine decay to 0 at the last iteration (default %(default)s)"""),
    ("--warmup", "warmup_iterations", int, None, """iterations of linear learning-rate warm-up
     (default %(default)s)"""),
    ("--workers", "workers", int, None, "data loading processes (default: 4 on CUDA, 0 on the CPU)"),
    ("--local-ignore-mm", "loss.local_ignore_mm", float, None, """voxels this close to a local
     query are never its negatives; larger values stop the loss from separating neighbours,
     e.g. 20 (default %(default)s)"""),
    ("--position-weight", "loss.position_weight", float, None, """weight of a relative-position
     objective: a linear probe, dropped after training, predicts the mm offset between two global
     voxels of a pair's views from their embeddings (default %(default)s: off)"""),
]  # fmt: skip
_CROSS_SETTINGS = [
    ("--cross-patient-share", "cross_patient_share", float, None, """with --pair-maps: chance
     that a crop pair spans two patients (default %(default)s)"""),
    ("--cross-patient-min-similarity", "cross_patient_min_similarity", float, None, """the local
     loss of cross-patient pairs uses only points where the map's local normalised
     cross-correlation reaches this (default %(default)s)"""),
    ("--cross-local-weight", "loss.cross_local_weight", float, None, """weight of the local loss
     on cross-patient pairs; 0 trains only the global embedding across patients
     (default %(default)s)"""),
    ("--cross-local-positive-mm", "loss.cross_local_positive_mm", float, None, """a cross-patient
     local query's partner must lie this close (default %(default)s)"""),
    ("--cross-local-ignore-mm", "loss.cross_local_ignore_mm", float, None, """voxels this close
     to a cross-patient local query are never its negatives (default %(default)s)"""),
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = command.new_parser(
        "train-sam",
        """Train the SAM network self-supervised on unlabelled CT scans (contrastive learning on
        overlapping crops of each scan). Do not train on scans you evaluate on: for OpenKBP, train
        on train_* and leave validation_* out, e.g. with --exclude-pattern 'validation_*'.""",
    )
    command.add_settings(parser, _SETTINGS, _DEFAULTS)
    _add_network_arguments(parser)
    _add_crop_arguments(parser)
    group = parser.add_argument_group(
        "cross-patient pairs", "crop pairs of two patients through maps cached by sam-pair-maps"
    )
    group.add_argument(
        "--pair-maps",
        type=Path,
        metavar="CACHE",
        help="folder written by 'same-register sam-pair-maps' from these training scans; "
        "enables cross-patient pairs (default: same-scan pairs only)",
    )
    command.add_settings(group, _CROSS_SETTINGS, _DEFAULTS)
    command.add_run_arguments(parser, _DEFAULTS)
    return parser


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--width",
        type=float,
        help="backbone width; 1 is the official network, 0.25 a slim CPU one (default: that of "
        f"--init-weights, else {_DEFAULTS.width:g})",
    )
    parser.add_argument(
        "--embedding-dim",
        type=int,
        help="size of the local and global embeddings, e.g. 64 for a cheaper network (default: "
        f"that of --init-weights, else {_DEFAULTS.embedding_dim})",
    )
    parser.add_argument(
        "--init-weights",
        type=Path,
        metavar="SAM.pth",
        help="start from these SAM weights (fine-tuning), e.g. the official SAM.pth or a model "
        "trained before (default: a freshly initialised network)",
    )


def _add_crop_arguments(parser: argparse.ArgumentParser) -> None:
    crops = _DEFAULTS.crops
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=list(crops.patch),
        help="voxels per view, multiples of 4 16 16 (default 32 96 96)",
    )
    parser.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(crops.scale_range),
        help="view spacing is 2 mm times a factor drawn in [LOW, HIGH]; larger factors give "
        "larger crops (in mm) for the global loss at the same cost (default 0.8 1.2)",
    )
    parser.add_argument(
        "--intensity-jitter",
        type=float,
        nargs=2,
        metavar=("SCALE", "SHIFT_HU"),
        default=[crops.intensity_scale, crops.intensity_shift_hu],
        help="per view, multiply HU by a random factor in [1 - SCALE, 1 + SCALE] and add a random "
        "shift in [-SHIFT_HU, SHIFT_HU], so that contrast differences between scanners do not "
        "change the embeddings, e.g. 0.1 30 (default 0 0: off, as in SAM)",
    )
    parser.add_argument(
        "--body-only",
        action="store_true",
        help="queries, keys and negatives only inside the body, not in the air around it",
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``train-sam``; 0 on success, 2 on a user error (printed as ``error: ...``)."""
    return command.run_command(build_parser(), argv, _train, "trained SAM weights")


def _train(args: argparse.Namespace, bars: command.Bars | None) -> Path:
    init = str(args.init_weights) if args.init_weights is not None else None
    start = load_sam_checkpoint(init) if init is not None else None
    # Explicit values, even bad ones, are passed on to be checked against the weights.
    width, dim = args.width, args.embedding_dim
    if width is None:
        width = start.width if start is not None else _DEFAULTS.width
    if dim is None:
        dim = start.embedding_dim if start is not None else _DEFAULTS.embedding_dim
    crops = CropConfig(
        patch=tuple(args.patch),
        scale_range=tuple(args.scale_range),
        intensity_scale=args.intensity_jitter[0],
        intensity_shift_hu=args.intensity_jitter[1],
        body_only=args.body_only,
    )
    config = SAMTrainConfig(
        **command.setting_values(args, _SETTINGS + _CROSS_SETTINGS),
        **command.run_settings(args),
        width=width,
        embedding_dim=dim,
        init_weights=init,
        pair_maps=str(args.pair_maps) if args.pair_maps is not None else None,
        crops=crops,
        loss=LossConfig(**command.setting_values(args, _SETTINGS + _CROSS_SETTINGS, "loss")),
    )
    scans = collect_scans(args.scans, args.exclude_pattern)
    return train_sam(
        scans, args.output, config, command.phase(bars, "train-sam"), resume=args.resume
    )
