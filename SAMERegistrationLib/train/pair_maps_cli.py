"""``same-register sam-pair-maps``: register seeded pairs of training scans and cache their maps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .command import Bars, add_progress_argument, new_parser, phase, run_command
from .pair_maps import DEFAULT_REGISTRATION, build_pair_maps
from .sam_trainer import check_scan_files, collect_scans


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "sam-pair-maps",
        """Register seeded pairs of training CT scans (MIND features, affine + coarse) and cache
        each pair's map, one file per pair, for 'train-sam --pair-maps'. Never give evaluation
        scans: for OpenKBP use --exclude-pattern 'validation_*'. An interrupted build continues
        when run again with the same arguments.""",
        output_help="cache folder",
    )
    parser.add_argument("--pairs", type=int, default=40, help="pairs to register (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    parser.add_argument(
        "--deform",
        action="store_true",
        help="also run the deform and instance stages (slower; default: affine + coarse)",
    )
    add_progress_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``sam-pair-maps``; 0 on success, 2 on a user error (printed as ``error: ...``)."""
    return run_command(build_parser(), argv, _build, "pair maps", _interrupted)


def _build(args: argparse.Namespace, bars: Bars | None) -> Path:
    registration = dict(DEFAULT_REGISTRATION)
    if args.deform:
        registration.update({"deform.enabled": True, "instance.enabled": True})
    scans = check_scan_files(collect_scans(args.scans, args.exclude_pattern))
    return build_pair_maps(
        scans, args.output, args.pairs, args.seed, registration, phase(bars, "pairs")
    )


def _interrupted(_output: Path) -> int:
    print("interrupted: run the same command again to continue.", file=sys.stderr)
    return 130
