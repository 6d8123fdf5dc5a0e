"""``same-register sam-pair-maps``: register seeded pairs of training scans and cache their maps."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import SameRegistrationError
from .command import Bars
from .pair_maps import DEFAULT_REGISTRATION, build_pair_maps
from .sam_trainer import check_scan_files, collect_scans


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="same-register sam-pair-maps",
        description="Register seeded pairs of training CT scans (MIND features, affine + coarse) "
        "and cache each pair's map, one file per pair, for 'train-sam --pair-maps'. Never give "
        "evaluation scans: for OpenKBP use --exclude-pattern 'validation_*'. An interrupted build "
        "continues when run again with the same arguments.",
    )
    parser.add_argument("scans", nargs="+", help="training CT volumes, or folders of them")
    parser.add_argument("-o", "--output", required=True, type=Path, help="cache folder")
    parser.add_argument(
        "--exclude-pattern",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out files whose name or path matches this shell pattern (repeatable)",
    )
    parser.add_argument("--pairs", type=int, default=40, help="pairs to register (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs (default 0)")
    parser.add_argument(
        "--deform",
        action="store_true",
        help="also run the deform and instance stages (slower; default: affine + coarse)",
    )
    parser.add_argument(
        "--progress", choices=["bars", "none"], default="bars", help="default %(default)s"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``sam-pair-maps``; 0 on success, 2 on a user error (printed as ``error: ...``)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    bars = Bars() if args.progress == "bars" else None
    registration = dict(DEFAULT_REGISTRATION)
    if args.deform:
        registration.update({"deform.enabled": True, "instance.enabled": True})
    try:
        scans = check_scan_files(collect_scans(args.scans, args.exclude_pattern))
        manifest = build_pair_maps(
            scans,
            args.output,
            args.pairs,
            args.seed,
            registration,
            None if bars is None else lambda done, total: bars.update("pairs", done, total),
        )
    except SameRegistrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue.", file=sys.stderr)
        return 130
    finally:
        if bars is not None:
            bars.close()
    print(f"pair maps: {manifest}")
    return 0
