"""``same-register train-sam``: self-supervised SAM training from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..features.sam_network import load_sam_checkpoint
from .command import Bars, add_input_arguments, add_run_arguments, phase, run_command
from .crops import CropConfig
from .sam_losses import LossConfig
from .sam_trainer import LR_SCHEDULES, OPTIMIZERS, SAMTrainConfig, collect_scans, train_sam

_DEFAULTS = SAMTrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="same-register train-sam",
        description="Train the SAM network self-supervised on unlabelled CT scans (contrastive "
        "learning on overlapping crops of each scan). Do not train on scans you evaluate on: for "
        "OpenKBP, train on train_* and leave validation_* out, e.g. with "
        "--exclude-pattern 'validation_*'.",
    )
    add_input_arguments(parser)
    parser.add_argument(
        "--iterations", type=int, default=_DEFAULTS.iterations, help="default %(default)s"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=_DEFAULTS.batch,
        help="crop pairs per iteration, from different scans (default %(default)s)",
    )
    parser.add_argument(
        "--patch",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=list(_DEFAULTS.crops.patch),
        help="voxels per view, multiples of 4 16 16 (default 32 96 96)",
    )
    parser.add_argument(
        "--width",
        type=float,
        help="backbone width; 1 is the official network, 0.25 a slim CPU one (default: that of "
        f"--init-weights, else {_DEFAULTS.width:g})",
    )
    parser.add_argument(
        "--init-weights",
        type=Path,
        metavar="SAM.pth",
        help="start from these SAM weights (fine-tuning), e.g. the official SAM.pth or a model "
        "trained before (default: a freshly initialised network)",
    )
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="default %(default)s")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=_DEFAULTS.optimizer,
        help="sgd (momentum 0.9, as in SAM) or adam, which learns faster in short runs "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=_DEFAULTS.lr_schedule,
        help="after the warm-up: constant (as in SAM) or a cosine decay to 0 at the last "
        "iteration (default %(default)s)",
    )
    parser.add_argument(
        "--intensity-jitter",
        type=float,
        nargs=2,
        metavar=("SCALE", "SHIFT_HU"),
        default=[_DEFAULTS.crops.intensity_scale, _DEFAULTS.crops.intensity_shift_hu],
        help="per view, multiply HU by a random factor in [1 - SCALE, 1 + SCALE] and add a random "
        "shift in [-SHIFT_HU, SHIFT_HU], so that contrast differences between scanners do not "
        "change the embeddings, e.g. 0.1 30 (default 0 0: off, as in SAM)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=_DEFAULTS.warmup_iterations,
        metavar="N",
        help="iterations of linear learning-rate warm-up (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="data loading processes (default: 4 on CUDA, 0 on the CPU)",
    )
    _add_embedding_arguments(parser)
    _add_cross_patient_arguments(parser)
    add_run_arguments(parser, _DEFAULTS)
    return parser


def _add_embedding_arguments(parser: argparse.ArgumentParser) -> None:
    loss = _DEFAULTS.loss
    parser.add_argument(
        "--embedding-dim",
        type=int,
        help="size of the local and global embeddings, e.g. 64 for a cheaper network (default: "
        f"that of --init-weights, else {_DEFAULTS.embedding_dim})",
    )
    parser.add_argument(
        "--scale-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=list(_DEFAULTS.crops.scale_range),
        help="view spacing is 2 mm times a factor drawn in [LOW, HIGH]; larger factors give "
        "larger crops (in mm) for the global loss at the same cost (default 0.8 1.2)",
    )
    parser.add_argument(
        "--body-only",
        action="store_true",
        help="queries, keys and negatives only inside the body, not in the air around it",
    )
    parser.add_argument(
        "--local-ignore-mm",
        type=float,
        default=loss.local_ignore_mm,
        help="voxels this close to a local query are never its negatives; larger values stop "
        "the loss from separating neighbours, e.g. 20 (default %(default)s)",
    )
    parser.add_argument(
        "--position-weight",
        type=float,
        default=loss.position_weight,
        help="weight of a relative-position objective: a linear probe, dropped after training, "
        "predicts the mm offset between two global voxels of a pair's views from their "
        "embeddings (default %(default)s: off)",
    )


def _add_cross_patient_arguments(parser: argparse.ArgumentParser) -> None:
    loss = _DEFAULTS.loss
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
    group.add_argument(
        "--cross-patient-share",
        type=float,
        default=_DEFAULTS.cross_patient_share,
        help="with --pair-maps: chance that a crop pair spans two patients (default %(default)s)",
    )
    group.add_argument(
        "--cross-patient-min-similarity",
        type=float,
        default=_DEFAULTS.cross_patient_min_similarity,
        help="the local loss of cross-patient pairs uses only points where the map's local "
        "normalised cross-correlation reaches this (default %(default)s)",
    )
    group.add_argument(
        "--cross-local-weight",
        type=float,
        default=loss.cross_local_weight,
        help="weight of the local loss on cross-patient pairs; 0 trains only the global "
        "embedding across patients (default %(default)s)",
    )
    group.add_argument(
        "--cross-local-positive-mm",
        type=float,
        default=loss.cross_local_positive_mm,
        help="a cross-patient local query's partner must lie this close (default %(default)s)",
    )
    group.add_argument(
        "--cross-local-ignore-mm",
        type=float,
        default=loss.cross_local_ignore_mm,
        help="voxels this close to a cross-patient local query are never its negatives "
        "(default %(default)s)",
    )


def _embedding_dim(given: int | None, start) -> int:
    if given is not None:  # passed on to be checked against the weights
        return given
    return start.embedding_dim if start is not None else _DEFAULTS.embedding_dim


def main(argv: list[str] | None = None) -> int:
    """Run ``train-sam``; 0 on success, 2 on a user error (printed as ``error: ...``)."""
    return run_command(build_parser(), argv, _train, "trained SAM weights")


def _train(args: argparse.Namespace, bars: Bars | None) -> Path:
    init = str(args.init_weights) if args.init_weights is not None else None
    start = load_sam_checkpoint(init) if init is not None else None
    width = args.width
    if width is None:  # an explicit width, even a bad one, is passed on to be checked
        width = start.width if start is not None else _DEFAULTS.width
    config = SAMTrainConfig(
        iterations=args.iterations,
        batch=args.batch,
        width=width,
        embedding_dim=_embedding_dim(args.embedding_dim, start),
        lr=args.lr,
        optimizer=args.optimizer,
        lr_schedule=args.lr_schedule,
        init_weights=init,
        warmup_iterations=args.warmup,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        workers=args.workers,
        pair_maps=str(args.pair_maps) if args.pair_maps is not None else None,
        cross_patient_share=args.cross_patient_share,
        cross_patient_min_similarity=args.cross_patient_min_similarity,
        crops=CropConfig(
            patch=tuple(args.patch),
            scale_range=tuple(args.scale_range),
            intensity_scale=args.intensity_jitter[0],
            intensity_shift_hu=args.intensity_jitter[1],
            body_only=args.body_only,
        ),
        loss=LossConfig(
            local_ignore_mm=args.local_ignore_mm,
            cross_local_positive_mm=args.cross_local_positive_mm,
            cross_local_ignore_mm=args.cross_local_ignore_mm,
            cross_local_weight=args.cross_local_weight,
            position_weight=args.position_weight,
        ),
    )
    scans = collect_scans(args.scans, args.exclude_pattern)
    return train_sam(scans, args.output, config, phase(bars, "train-sam"), resume=args.resume)
